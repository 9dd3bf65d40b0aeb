"""Model cards for everything this project saves, as the Hub parses them (`huggingface_hub.ModelCard`).

[`write_model_card`] fills the template `model_cards/<kind>.md` with the sizes of the saved model's config, the
evaluation metrics its run measured, and the papers' numbers (`model_cards/paper_results.json`) when the config
matches one of their presets. docs/hub.md ("Model cards") describes what a card holds.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import PretrainedConfig

from modeling_beitv2 import BEITV2_PRESETS, VQKD_PRESETS
from modeling_beitv2.configuration_vqkd import VQKD_VIT_SIZES

logger = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "model_cards"
CardKind = Literal["vqkd", "mim", "feature_extractor", "classifier", "segmentation", "dvae", "pixel_decoder"]
CARD_KINDS: tuple[CardKind, ...] = get_args(CardKind)
# The config `model_type` each kind of card describes: a card is never written for another kind of model.
CARD_MODEL_TYPES = {
    "vqkd": "beitv2_vqkd",
    "mim": "beitv2",
    "feature_extractor": "beit",
    "classifier": "beit",
    "segmentation": "upernet",
    "dvae": "beit_dvae",
    "pixel_decoder": "beitv2_vqkd_pixel_decoder",
}
# What the usage snippet loads when no Hub id is known; the card says to upload first and replace it.
HUB_ID_PLACEHOLDER = "<your-username>/<model-name>"
BASE_MODEL_PLACEHOLDER = "<base-model-repo-id>"
LICENSE_HELP = (
    "License of the saved weights, written to the model card metadata: a Hub license id such as mit, apache-2.0 "
    "or cc-by-nc-4.0. Unset: no license is declared; choose one compatible with the training data's terms."
)
# Hub license ids are lowercase: "mit", "apache-2.0", "cc-by-nc-sa-4.0", "openrail++", "other".
_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")

_FAMILY_NAMES = {"beitv2": "BEiT v2", "beit": "BEiT"}


class MetricSpec(NamedTuple):
    """How one logged evaluation metric appears in `model-index`: its task and its metric, each an id and a name.
    `of_this_model` is False for a baseline measured beside the model: in the card's table, not in `model-index`."""

    task_type: str
    task_name: str
    metric_type: str
    metric_name: str
    of_this_model: bool


@functools.cache
def eval_metrics() -> Mapping[str, MetricSpec]:
    """The allow-list of evaluation metrics the scripts log (`model_cards/eval_metrics.json`), in its order. Anything
    else a run logged (`lr`, `grad_norm`, the training loss, `eval_runtime`, ...) stays off the card."""
    table = json.loads((TEMPLATES_DIR / "eval_metrics.json").read_text(encoding="utf-8"))
    return {
        name: MetricSpec(task["type"], task["name"], metric_type, metric_name, name not in table["baselines"])
        for task in table["tasks"]
        for name, (metric_type, metric_name) in task["metrics"].items()
    }


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """Split a card into its parsed YAML front matter and its markdown body."""
    front_matter = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    if front_matter is None:
        raise ValueError("A model card must start with a YAML front-matter block between two '---' lines.")
    metadata = yaml.safe_load(front_matter[1]) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"The model card front matter is a {type(metadata).__name__}, expected a mapping.")
    return metadata, text[front_matter.end() :]


def _grid(image_size: int, patch_size: int, side: int) -> dict[str, Any]:
    return {"image_size": image_size, "patch_size": patch_size, "patch_grid": f"{side}x{side}"}


def _attributes(config: PretrainedConfig, *names: str) -> dict[str, Any]:
    return {name: getattr(config, name) for name in names}


def _vit_rows(config: PretrainedConfig) -> dict[str, Any]:
    return {
        **_grid(config.image_size, config.patch_size, config.image_size // config.patch_size),
        **_attributes(config, "hidden_size", "num_hidden_layers", "num_attention_heads"),
        "size_preset": match_vit_preset(config) or "custom",
    }


def describe_architecture(config: PretrainedConfig) -> dict[str, Any]:
    """The sizes a card shows, read from the saved config of one of the [`CARD_MODEL_TYPES`]: image and patch size
    (px), the patch grid, width, depth, heads, the size preset it matches (or `"custom"`), and codebook / labels
    where the model has them."""
    model_type = config.model_type
    if model_type == "beitv2_vqkd":
        return {
            **_vit_rows(config.encoder_config),
            "size_preset": match_vqkd_preset(config) or "custom",
            "decoder_layers": config.decoder_config.num_hidden_layers,
            **_attributes(config, "codebook_size", "code_dim", "teacher_dim"),
        }
    if model_type == "beitv2":
        return {
            **_vit_rows(config),
            "visual_token_vocab_size": config.vocab_size,
            "use_patch_aggregation": config.use_patch_aggregation,
        }
    if model_type in ("beit", "upernet"):
        vit = config.backbone_config if model_type == "upernet" else config
        return {**_vit_rows(vit), "num_labels": config.num_labels}
    if model_type == "beit_dvae":
        side = config.patch_grid[0]  # three 2x poolings: one code per 8x8 pixels
        return {
            **_grid(config.image_size, config.image_size // side, side),
            **_attributes(config, "codebook_size", "hidden_size"),
        }
    pixel_decoder_sizes = ("codebook_size", "code_dim", "hidden_size", "num_hidden_layers", "num_attention_heads")
    return {  # "beitv2_vqkd_pixel_decoder"
        **_grid(config.image_size, config.patch_size, config.patch_grid[0]),
        **_attributes(config, *pixel_decoder_sizes),
    }


def derived_family(config: PretrainedConfig) -> str | None:
    """The paper a model follows when its config tells (`"beitv2"`: MIM with the patch-aggregation head, VQ-KD, the
    pixel decoder; `"beit"`: MIM without it, the dVAE); None for a native `beit` or `upernet` model."""
    if config.model_type == "beitv2":
        return "beitv2" if config.use_patch_aggregation else "beit"
    return {"beitv2_vqkd": "beitv2", "beitv2_vqkd_pixel_decoder": "beitv2", "beit_dvae": "beit"}.get(config.model_type)


def measured_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The finite evaluation metrics of `metrics` that [`eval_metrics`] knows, as floats, in its order."""
    metrics = dict(metrics or {})
    kept = {name: float(metrics[name]) for name in eval_metrics() if name in metrics}
    for name, value in list(kept.items()):
        if not math.isfinite(value):
            del kept[name]
            logger.warning("%s is %s: left off the model card.", name, value)
    left_off = sorted(set(metrics) - set(kept))
    if left_off:
        logger.info("Not evaluation metrics of the model, left off its card: %s", ", ".join(left_off))
    return kept


def eval_results(metrics: Mapping[str, float], dataset: str | None) -> list[EvalResult]:
    """`model-index` entries for the measured metrics that are this model's results (baselines excluded), on the
    Hub dataset `dataset` (None: local images)."""
    return [
        EvalResult(
            task_type=spec.task_type,
            task_name=spec.task_name,
            dataset_type=dataset or "custom",
            dataset_name=dataset or "Local held-out images",
            metric_type=spec.metric_type,
            metric_name=spec.metric_name,
            metric_value=value,
        )
        for name, value in metrics.items()
        if (spec := eval_metrics()[name]).of_this_model
    ]


def check_hub_model_id(hub_model_id: str | None, what: str = "hub_model_id") -> None:
    """Raise a ValueError unless `hub_model_id` is None or a Hub repo id (`name` or `namespace/name`), so that a
    local folder never reaches a card (`what` names the argument in the message)."""
    if hub_model_id is None:
        return
    try:
        validate_repo_id(hub_model_id)
    except HFValidationError as error:
        raise ValueError(
            f"{what} must be a Hub repo id such as 'user/beitv2-base-ft1k', not a local path; got "
            f"{hub_model_id!r} ({error})."
        ) from None


def hub_reference(name_or_path: str | None) -> str | None:
    """`name_or_path` when it names a Hub repo, else None (a local folder or file, or nothing): cards name Hub
    models (`base_model`, the teacher) but never a path on the machine that trained them."""
    if name_or_path is None or os.path.exists(name_or_path):
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def check_license(license: str | None) -> None:
    """Raise a ValueError unless `license` is None or looks like a Hub license id (lowercase, e.g. `mit`)."""
    if license is not None and not _LICENSE_ID.fullmatch(license):
        raise ValueError(
            f"license must be a Hub license id such as 'mit', 'apache-2.0', 'cc-by-nc-4.0' or 'other' (lowercase); "
            f"got {license!r}."
        )


def _markdown_table(header: tuple[str, ...], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_format_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def build_model_card(
    kind: CardKind,
    *,
    config: PretrainedConfig,
    model_name: str,
    hub_model_id: str | None = None,
    license: str | None = None,
    family: str | None = None,
    base_model: str | None = None,
    datasets: Iterable[str] = (),
    training_args: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    source_note: str = "",
    tags: Iterable[str] = (),
    teacher: str | None = None,
) -> ModelCard:
    """Render the `kind` template (one of [`CARD_KINDS`], matching the config's `model_type`) into a
    `huggingface_hub.ModelCard`; every size on the card is read from `config`.

    Args:
        hub_model_id: the Hub repo id the usage snippet loads; None: a marked placeholder.
        license: a Hub license id for the metadata; None leaves it out and the card says none was chosen.
        family: `"beitv2"` or `"beit"`, the paper whose numbers may describe the model; None: [`derived_family`].
        datasets: Hub dataset ids used for training; the first also names the evaluation data in `model-index`.
        metrics: what the run logged; its evaluation metrics ([`measured_metrics`]) become the card's results.
    """
    if kind not in CARD_KINDS:
        raise ValueError(f"Unknown model card kind {kind!r}; choose one of {list(CARD_KINDS)}.")
    if config.model_type != CARD_MODEL_TYPES[kind]:
        raise ValueError(
            f"A {kind!r} card describes a {CARD_MODEL_TYPES[kind]!r} model, but the config is a "
            f"{config.model_type!r} one."
        )
    if family not in (None, *_FAMILY_NAMES):
        raise ValueError(f"Unknown family {family!r}; choose one of {list(_FAMILY_NAMES)}.")
    check_hub_model_id(hub_model_id)
    check_hub_model_id(base_model, "base_model")  # callers pass `hub_reference(name_or_path)`
    check_license(license)
    family = family or derived_family(config)
    datasets = list(datasets)
    # A template declares no license (`license=` below would clash): that is the caller's choice alone.
    template_metadata, body = split_front_matter((TEMPLATES_DIR / f"{kind}.md").read_text(encoding="utf-8"))

    architecture = describe_architecture(config)
    measured = measured_metrics(metrics)
    results = eval_results(measured, datasets[0] if datasets else None)
    paper_rows = paper_results_rows(kind, architecture, family)
    values = {
        **{key: _format_value(value) for key, value in architecture.items()},
        "model_id": hub_model_id or HUB_ID_PLACEHOLDER,
        "base_model_id": base_model or BASE_MODEL_PLACEHOLDER,
        "title": model_name,
        "family_name": _FAMILY_NAMES.get(family or "", "BEiT"),
        "source_note": source_note,
        "aggregation_note": " (BEiT v2 also trains a patch-aggregation head, kept here)"
        if architecture.get("use_patch_aggregation")
        else "",
        "teacher": teacher or "see the training details",
        "usage_note": ""
        if hub_model_id
        else (
            f"> This card was written before the model had a Hub repo id, so the snippet loads the placeholder "
            f"`{HUB_ID_PLACEHOLDER}`. Upload this folder first (`hf upload {HUB_ID_PLACEHOLDER} "
            "path/to/this/folder`, or train with `--push_to_hub --hub_model_id ...`), then use your repo id.\n\n"
        ),
        "architecture": _markdown_table(("setting", "value"), architecture.items()),
        "training": _markdown_table(("argument", "value"), training_args.items())
        if training_args
        else "Not recorded.",
        "measured_results": (
            f"Measured on held-out images of {datasets[0] if datasets else 'the local evaluation data'}:\n\n"
            + _markdown_table(
                ("metric", "value", "meaning"),
                ((name, value, eval_metrics()[name].metric_name) for name, value in measured.items()),
            )
            if measured
            else "No evaluation metrics were measured by this project for this checkpoint."
        ),
        "paper_results": (
            "These numbers are **reported by the paper** for the original models; they were not measured by "
            "this project and are not claims about this checkpoint.\n\n"
            + _markdown_table(("metric", "setting", "value", "source"), paper_rows)
            if paper_rows
            else "The paper reports no numbers for this configuration."
        ),
        "license_note": f"`{license}` (declared by whoever saved these weights)."
        if license
        else "No license was declared for these weights (`--license`). Choose one compatible with the terms of "
        "the training data before sharing them.",
    }
    data = ModelCardData(
        model_name=model_name if results else None,  # only `model-index` uses it
        eval_results=results or None,
        license=license,
        library_name=template_metadata.pop("library_name", None),
        pipeline_tag=template_metadata.pop("pipeline_tag", None),
        tags=list(dict.fromkeys([*template_metadata.pop("tags", []), *tags])),
        datasets=datasets or None,
        base_model=base_model,
        **template_metadata,
    )
    rendered_body = string.Template(body).substitute(values)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{rendered_body}")


def write_model_card(
    output_dir: str | os.PathLike, kind: CardKind, *, config: PretrainedConfig, **kwargs: Any
) -> Path:
    """Build a card with [`build_model_card`] (same keyword arguments; `model_name` defaults to the Hub repo's
    name, else the folder's) and write it to `output_dir/README.md`. Returns that path."""
    hub_model_id = kwargs.get("hub_model_id")
    kwargs.setdefault("model_name", hub_model_id.split("/")[-1] if hub_model_id else Path(output_dir).resolve().name)
    card = build_model_card(kind, config=config, **kwargs)
    path = Path(output_dir) / "README.md"
    card.save(path)  # creates the folder
    return path


_VIT_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _matching_size(config: PretrainedConfig, sizes: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The name of the entry of `sizes` whose widths and depth `config` has, or None."""
    found = tuple(getattr(config, key, None) for key in _VIT_SIZE_KEYS)
    return next((name for name, size in sizes.items() if found == tuple(size[key] for key in _VIT_SIZE_KEYS)), None)


def match_vit_preset(config: PretrainedConfig) -> str | None:
    """The name of the `BEITV2_PRESETS` size (`"tiny"` ... `"large"`) whose widths and depth `config` has, or None."""
    return _matching_size(config, BEITV2_PRESETS)


def match_vqkd_preset(config: PretrainedConfig) -> str | None:
    """The name of the `VQKD_PRESETS` tokenizer (e.g. `"base-decoder3"`) whose encoder widths and depth and
    decoder depth a `VQKDConfig` has, or None."""
    sizes = (_matching_size(config.encoder_config, VQKD_VIT_SIZES), config.decoder_config.num_hidden_layers)
    return next(
        (name for name, preset in VQKD_PRESETS.items() if (preset["size"], preset["decoder_layers"]) == sizes), None
    )


def paper_results_rows(kind: str, architecture: Mapping[str, Any], family: str | None) -> list[list[str]]:
    """The paper's numbers that describe a model of this kind with these [`describe_architecture`] sizes: rows of
    the paper's preset the sizes match (with 16 px patches; for VQ-KD also the 8192 x 32 codebook), else none."""
    paper = json.loads((TEMPLATES_DIR / "paper_results.json").read_text(encoding="utf-8"))
    if architecture["patch_size"] != paper["patch_size"]:
        return []
    rows: list[list[str]]
    if kind == "vqkd":
        rows = paper["vqkd"].get(architecture["size_preset"], [])
        return rows if [architecture["codebook_size"], architecture["code_dim"]] == paper["vqkd_codebook"] else []
    prefixes = tuple(paper["rows_for_kind"].get(kind, ()))
    rows = paper["vit"].get(family, {}).get(architecture.get("size_preset"), [])
    return [row for row in rows if row[0].startswith(prefixes)]
