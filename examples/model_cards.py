"""Model cards for everything this project saves: render a template from `model_cards/` and write `README.md`.

The training scripts and the checkpoint converter call [`write_model_card`] once their model is saved::

    from model_cards import write_model_card

    write_model_card(
        training_args.output_dir,
        "classifier",                       # "vqkd", "mim", "classifier", "segmentation" or "dvae"
        model_id="user/beitv2-base-patch16-224-ft1k",
        family="beitv2", size="base",       # picks the paper's numbers for this model
        base_model="user/beitv2-base-patch16-224-pt1k-mim",
        datasets=["imagenet-1k"],
        training_args={"learning_rate": 5e-4, "epochs": 100, ...},   # what the script was run with
        metrics={"eval_accuracy": 0.851},   # numbers THIS run measured
    )

Numbers measured by the run (`metrics`) and numbers the paper reports (a fixed table, chosen by `kind`, `family`
and `size`) go to two separate, labelled sections; they are never mixed. The YAML front matter the Hub reads
(`library_name`, `pipeline_tag`, `tags`, `datasets`, `license`, `base_model`) starts from the template's and is
completed here, then written with `yaml.safe_dump`, so it always parses.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "model_cards"
CARD_KINDS = ("vqkd", "mim", "classifier", "segmentation", "dvae")
CardKind = Literal["vqkd", "mim", "classifier", "segmentation", "dvae"]

PAPER_BEITV2 = "BEiT v2 paper (Peng et al., 2022)"
PAPER_BEIT = "BEiT paper (Bao et al., 2021)"

# (family, size) -> rows of (what, setting, value, source). Fixed numbers from the papers, never measured here.
PAPER_RESULTS: dict[tuple[str, str], list[tuple[str, str, str, str]]] = {
    ("beitv2", "base"): [
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-B/16, 300 epochs pretraining", "85.0", PAPER_BEITV2),
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-B/16, 1600 epochs pretraining", "85.5", PAPER_BEITV2),
        ("ImageNet-1k linear probe top-1 (%)", "ViT-B/16, 300 epochs pretraining", "80.1", PAPER_BEITV2),
        ("ADE20K mIoU", "ViT-B/16 + UperNet, 300 epochs pretraining", "52.7", PAPER_BEITV2),
        ("ADE20K mIoU", "ViT-B/16 + UperNet, 1600 epochs pretraining", "53.1", PAPER_BEITV2),
    ],
    ("beitv2", "large"): [
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-L/16, 300 epochs pretraining", "86.6", PAPER_BEITV2),
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-L/16, 1600 epochs pretraining", "87.3", PAPER_BEITV2),
        ("ADE20K mIoU", "ViT-L/16 + UperNet, 300 epochs pretraining", "55.0", PAPER_BEITV2),
        ("ADE20K mIoU", "ViT-L/16 + UperNet, 1600 epochs pretraining", "56.7", PAPER_BEITV2),
    ],
    ("beit", "base"): [
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-B/16", "83.2", PAPER_BEIT),
        ("ImageNet-1k linear probe top-1 (%)", "ViT-B/16", "56.7", PAPER_BEIT),
    ],
    ("beit", "large"): [
        ("ImageNet-1k fine-tuning top-1 (%)", "ViT-L/16, 800 epochs pretraining", "85.2", PAPER_BEIT),
    ],
}
PAPER_VQKD_RESULTS = [
    ("reconstruction loss", "ViT-B encoder, 3x768x12 decoder, 8192x32 codebook", "0.145", PAPER_BEITV2 + ", Table 4"),
    ("codebook usage", "ViT-B encoder, 3x768x12 decoder, 8192x32 codebook", "95%", PAPER_BEITV2 + ", Table 4"),
    ("reconstruction loss", "ViT-B encoder, 1x768x12 decoder", "0.164", PAPER_BEITV2 + ", Table 4"),
    ("codebook usage", "ViT-B encoder, 1x768x12 decoder", "100%", PAPER_BEITV2 + ", Table 4"),
]
# Which paper rows describe a model of each kind (the MIM model is described by what it fine-tunes to).
_PAPER_ROWS_FOR_KIND = {
    "classifier": ("ImageNet-1k fine-tuning", "ImageNet-1k linear probe"),
    "segmentation": ("ADE20K",),
    "mim": ("ImageNet-1k", "ADE20K"),
}

_FAMILY_NAMES = {"beitv2": "BEiT v2", "beit": "BEiT"}


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """Split a card into its parsed YAML front matter and its markdown body."""
    if not text.startswith("---\n"):
        raise ValueError("A model card must start with a '---' YAML front-matter block.")
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError("The YAML front matter of the model card is not closed by a '---' line.")
    metadata = yaml.safe_load(text[4:end]) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"The model card front matter is a {type(metadata).__name__}, expected a mapping.")
    return metadata, text[end + len("\n---\n") :]


def _markdown_table(header: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_format_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def paper_results_rows(kind: str, family: str | None, size: str | None) -> list[tuple[str, str, str, str]]:
    """The paper's numbers that describe a model of this kind, family and size (empty if none apply)."""
    if kind == "vqkd":
        return list(PAPER_VQKD_RESULTS)
    prefixes = _PAPER_ROWS_FOR_KIND.get(kind, ())
    rows = PAPER_RESULTS.get((family or "", size or ""), [])
    return [row for row in rows if row[0].startswith(prefixes)] if prefixes else []


def render_model_card(
    kind: CardKind,
    *,
    model_id: str,
    family: str | None = "beitv2",
    size: str | None = None,
    base_model: str | None = None,
    datasets: Iterable[str] = (),
    training_args: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    architecture: Mapping[str, Any] | None = None,
    source_note: str = "",
    tags: Iterable[str] = (),
    license: str = "mit",
    teacher: str | None = None,
    codebook_size: int | None = None,
) -> str:
    """Render the `kind` template into a model card (a string with YAML front matter and a markdown body).

    Args:
        kind: `"vqkd"`, `"mim"`, `"classifier"`, `"segmentation"` or `"dvae"`.
        model_id: the Hub repo id (or local folder) the usage snippet loads.
        family: `"beitv2"` or `"beit"`; with `size` (`"base"`, `"large"`, ...) it selects the paper's numbers.
        base_model: the Hub id of the model this one was trained from (`base_model` metadata).
        datasets: Hub dataset ids used for training (`datasets` metadata).
        training_args: how the model was trained (or converted), shown as a table.
        metrics: numbers measured by this run, shown under "Results measured by this project".
        architecture: sizes worth showing (width, depth, heads, image and patch size, ...).
        source_note: one sentence on where the weights come from (e.g. "Converted from ...").
        tags: extra Hub tags, added to the template's.
        license: the weights' license (`mit` for the official BEiT releases).
        teacher, codebook_size: VQ-KD / dVAE details shown in the description.
    """
    if kind not in CARD_KINDS:
        raise ValueError(f"Unknown model card kind {kind!r}; choose one of {list(CARD_KINDS)}.")
    if family not in (None, *_FAMILY_NAMES):
        raise ValueError(f"Unknown family {family!r}; choose one of {list(_FAMILY_NAMES)}.")
    template_metadata, body = split_front_matter((TEMPLATES_DIR / f"{kind}.md").read_text(encoding="utf-8"))

    metadata = {**template_metadata, "license": license}
    metadata["tags"] = list(dict.fromkeys([*template_metadata.get("tags", []), *tags]))
    datasets = list(datasets)
    if datasets:
        metadata["datasets"] = datasets
    if base_model:
        metadata["base_model"] = base_model

    architecture = dict(architecture or {})
    measured = dict(metrics or {})
    paper_rows = paper_results_rows(kind, family, size)
    values = {
        "model_id": model_id,
        "title": model_id.rstrip("/").split("/")[-1],
        "family_name": _FAMILY_NAMES.get(family or "", "BEiT"),
        "source_note": source_note,
        "aggregation_note": " (BEiT v2 also trains a patch-aggregation head, kept here)" if family == "beitv2" else "",
        "teacher": teacher or "see training details",
        "codebook_size": codebook_size if codebook_size is not None else architecture.get("codebook_size", 8192),
        "image_size": architecture.get("image_size", 224),
        "patch_size": architecture.get("patch_size", 16),
        "architecture": _markdown_table(("setting", "value"), architecture.items())
        if architecture
        else "See `config.json`.",
        "training": _markdown_table(("argument", "value"), (training_args or {}).items())
        if training_args
        else "Not recorded.",
        "measured_results": _markdown_table(("metric", "value"), measured.items())
        if measured
        else "No numbers measured by this project for this checkpoint yet.",
        "paper_results": (
            "These numbers are **reported by the paper** for the original models; they were not measured by "
            "this project and are not claims about this checkpoint.\n\n"
            + _markdown_table(("metric", "setting", "value", "source"), paper_rows)
            if paper_rows
            else "The paper reports no numbers for this configuration."
        ),
    }
    rendered_body = string.Template(body).substitute(values)
    front_matter = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    return f"---\n{front_matter}---\n{rendered_body}"


def write_model_card(output_dir: str | os.PathLike, kind: CardKind, **kwargs: Any) -> Path:
    """Render a card with [`render_model_card`] (same keyword arguments) and write it to `output_dir/README.md`."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(kind, **kwargs), encoding="utf-8")
    return path
