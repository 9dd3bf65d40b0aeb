"""Convert a released BEiT / BEiT v2 checkpoint (microsoft/unilm, timm, DALL-E) into a `from_pretrained` folder.

    python examples/convert_unilm_checkpoint.py --kind beitv2_pretrain \
        --checkpoint beitv2_base_patch16_224_pt1k.pth --output_dir beitv2-base-patch16-224-pt1k-mim

writes `model.safetensors`, `config.json`, `preprocessor_config.json` and a model card (`README.md`); custom-code
models (VQ-KD, MIM, dVAE) also get their code files so that they load with `trust_remote_code=True`.
`--push_to_hub --hub_model_id user/name` uploads the folder. Kinds, shape inference and key accounting are
documented in `modeling_beitv2/convert_unilm.py`; the image processor is built here, from the reference's
evaluation preprocessing the conversion reports, with `processing/evaluation.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from transformers.models.beit.image_processing_pil_beit import BeitImageProcessorPil

from modeling_beitv2.convert_unilm import (
    CONVERSION_KINDS,
    EvaluationPreprocessing,
    convert_checkpoint,
    save_conversion,
)
from pretraining.model_cards import CardKind, check_hub_model_id, check_license, write_model_card
from processing.evaluation import Normalisation, evaluation_image_processor, family_normalisation

logger = logging.getLogger(__name__)

# Which model-card template describes each kind of converted model.
_CARD_KIND: dict[str, CardKind] = {
    "vqkd": "vqkd",
    "beitv2_pretrain": "mim",
    "beit_pretrain": "mim",
    "finetuned": "classifier",
    "timm": "classifier",
    "dalle_dvae": "dvae",
}


# The tokenizers read plain [0, 1] pixels and map them to their own input range themselves.
_UNIT_PIXELS: Normalisation = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def conversion_image_processor(preprocessing: EvaluationPreprocessing) -> BeitImageProcessorPil:
    """The image processor saved beside a converted model: the reference's evaluation preprocessing."""
    if preprocessing.normalisation is None:
        image_mean, image_std = _UNIT_PIXELS
    else:
        image_mean, image_std = family_normalisation(preprocessing.normalisation)
    return evaluation_image_processor(
        preprocessing.image_size,
        image_mean,
        image_std,
        crop_pct=preprocessing.crop_pct,
        resample=preprocessing.resample,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, choices=CONVERSION_KINDS)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint file (.pth/.bin/.safetensors); for dalle_dvae the folder with encoder.pkl and decoder.pkl",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_attention_heads", type=int, default=None, help="override the inferred head count")
    parser.add_argument(
        "--early_layers",
        type=int,
        default=None,
        help="beitv2_pretrain only: block feeding the patch-aggregation head (default: depth - 3)",
    )
    parser.add_argument("--image_size", type=int, default=None, help="checked against the stored position tables")
    parser.add_argument("--id2label", default=None, help="JSON file {index: class name} for a classifier")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None, help="user/name of the Hub repo (required with --push_to_hub)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument(
        "--license",
        default="mit",
        help="license id written to the model card (default: mit, the license of the official releases in "
        "microsoft/unilm and openai/DALL-E)",
    )
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. user/beitv2-base-patch16-224-pt1k-mim)")
    try:
        check_license(args.license)
        check_hub_model_id(args.hub_model_id)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> Path:
    """Convert the checkpoint the command line names; returns the output folder."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    id2label = None
    if args.id2label:
        with open(args.id2label) as f:
            id2label = {int(k): v for k, v in json.load(f).items()}
    result = convert_checkpoint(
        args.kind,
        args.checkpoint,
        num_attention_heads=args.num_attention_heads,
        early_layers=args.early_layers,
        image_size=args.image_size,
        id2label=id2label,
    )
    output_dir = save_conversion(result, args.output_dir)
    conversion_image_processor(result.preprocessing).save_pretrained(output_dir)
    write_model_card(
        output_dir,
        _CARD_KIND[args.kind],
        config=result.model.config,  # sizes, codebook and paper preset are read from it
        hub_model_id=args.hub_model_id,
        license=args.license,
        family=result.notes.get("family"),
        source_note=f"Converted from the official checkpoint `{Path(args.checkpoint).name}` with "
        "`examples/convert_unilm_checkpoint.py` of beitv2-hf; the weights were not retrained.",
        training_args={
            "converted from": Path(args.checkpoint).name,
            "conversion kind": args.kind,
            **{k: v for k, v in result.notes.items() if v is not None},
        },
        teacher=result.notes.get("teacher"),
    )
    logger.info("Converted %s (%s) into %s", args.checkpoint, args.kind, output_dir)
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.hub_model_id, private=args.private, exist_ok=True)
        api.upload_folder(
            repo_id=args.hub_model_id, folder_path=output_dir, commit_message=f"Convert {args.kind} checkpoint"
        )
        logger.info("Pushed to https://huggingface.co/%s", args.hub_model_id)
    return output_dir


if __name__ == "__main__":
    main()
