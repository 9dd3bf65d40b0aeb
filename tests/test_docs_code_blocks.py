"""Every ```python block of README.md and docs/*.md runs as written, offline.

Each page's blocks run in order in one namespace, in a fresh Python process whose working directory is an empty
temporary folder, as a reader pasting them one after the other would. Snippets load real Hub ids: before they run,
tiny stand-ins of those repositories are written into a temporary Hugging Face cache under exactly those ids
(``models--{org}--{name}/snapshots/{commit}`` + ``refs/main``), and the process runs with ``HF_HUB_OFFLINE=1``, so
``from_pretrained("user/...")`` resolves exactly as it does on a user's machine after a download, custom code
(``trust_remote_code=True``) included.

A block that cannot run (a diagram, a template, pseudo-output) says so with ``<!-- not-run: reason -->`` on the line
before it; this test keeps the number of such blocks small and refuses a block of any other language without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_readme_commands import DOC_PAGES, REPO, MarkdownBlock, fenced_blocks

# Languages this test knows how to check: python blocks are executed here, bash blocks' `python examples/...`
# commands are parsed by tests/test_readme_commands.py. Anything else needs a not-run reason.
CHECKED_LANGUAGES = {"python", "bash"}
MAX_NOT_RUN_BLOCKS = 6

# The Hub ids the snippets load, each with a builder of a tiny stand-in that has the real repository's interface
# (model class, image size, patch size, feature sizes the snippets rely on).
HUB_IDS = (
    "openai/clip-vit-base-patch16",
    "user/beitv2-base-patch16-224-pt1k-vqkd-clip",
    "user/beitv2-base-patch16-224-pt1k-mim",
    "user/beitv2-base-patch16-224-pt1k-ft1k",
)

_RUNNER = r"""
import json, sys, traceback
blocks = json.loads(open(sys.argv[1]).read())
namespace = {"__name__": "__main__"}
for block in blocks:
    # Leading newlines make tracebacks point at the block's line in the Markdown page.
    code = compile("\n" * block["line"] + block["code"], block["page"], "exec")
    try:
        exec(code, namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"the block at {block['page']}:{block['line']} failed")
"""


def _blocks_by_page() -> dict[str, list[MarkdownBlock]]:
    return {page.relative_to(REPO).as_posix(): fenced_blocks(page) for page in DOC_PAGES}


BLOCKS = _blocks_by_page()
PAGES_WITH_PYTHON = [
    page for page, blocks in BLOCKS.items() if any(b.language == "python" and b.not_run is None for b in blocks)
]


def _save_tiny_repository(repo_id: str, folder: Path) -> None:
    """Write a tiny stand-in of the Hub repository `repo_id` into `folder`."""
    from transformers import (
        BeitConfig,
        BeitForImageClassification,
        BeitImageProcessor,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    import modeling_beitv2
    import processing

    torch.manual_seed(0)
    tiny_vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if repo_id == "openai/clip-vit-base-patch16":
        # CLIP ViT-B/16's interface: 16 px patches at 224 px and 512 projected features per patch.
        config = CLIPVisionConfig(**tiny_vit, image_size=224, patch_size=16, projection_dim=512)
        CLIPVisionModelWithProjection(config).save_pretrained(folder)
        CLIPImageProcessor().save_pretrained(folder)
    elif repo_id.endswith("-vqkd-clip"):
        # kmeans_init=False: random unit codes, ready to tokenize, as a released or trained tokenizer is.
        config = modeling_beitv2.VQKDConfig(
            encoder_config=tiny_vit,
            decoder_config={**tiny_vit, "num_hidden_layers": 1},
            teacher_dim=512,
            kmeans_init=False,
        )
        tokenizer = modeling_beitv2.VQKDModel(config)
        tokenizer.save_pretrained(folder)
        processing.VQKDImageProcessor().save_pretrained(folder)
    elif repo_id.endswith("-mim"):
        config = modeling_beitv2.BeitV2Config(**tiny_vit, early_layers=1, head_layers=1)
        modeling_beitv2.BeitV2ForMaskedImageModeling(config).save_pretrained(folder)
        processing.BeitV2ImageProcessor().save_pretrained(folder)
    elif repo_id.endswith("-ft1k"):
        labels = ["tabby cat", "golden retriever", "goldfish"]
        config = BeitConfig(
            **tiny_vit,
            use_mean_pooling=True,
            use_relative_position_bias=True,
            id2label=dict(enumerate(labels)),
            label2id={label: index for index, label in enumerate(labels)},
        )
        BeitForImageClassification(config).save_pretrained(folder)
        BeitImageProcessor(
            size={"height": 224, "width": 224}, crop_size={"height": 224, "width": 224}
        ).save_pretrained(folder)
    else:
        raise ValueError(f"No stand-in for {repo_id!r}; known ids: {HUB_IDS}.")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache (`HF_HUB_CACHE` layout) holding a tiny stand-in for every id in `HUB_IDS`."""
    cache = tmp_path_factory.mktemp("hf_home") / "hub"
    for repo_id in HUB_IDS:
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repository = cache / f"models--{repo_id.replace('/', '--')}"
        _save_tiny_repository(repo_id, repository / "snapshots" / commit)
        (repository / "refs").mkdir(parents=True)
        (repository / "refs" / "main").write_text(commit)
    return cache


def test_every_block_is_checked_or_says_why_not():
    not_run = []
    for page, blocks in BLOCKS.items():
        for block in blocks:
            where = f"{page}:{block.line}"
            if block.not_run is not None:
                assert block.not_run.strip(), f"{where}: the not-run marker needs a reason"
                not_run.append(f"{where} ({block.not_run})")
            else:
                assert block.language in CHECKED_LANGUAGES, (
                    f"{where}: a ```{block.language or ''} block is neither run nor parsed; write it as "
                    f"```python / ```bash or put `<!-- not-run: reason -->` on the line before it"
                )
    assert len(not_run) <= MAX_NOT_RUN_BLOCKS, "too many blocks are not run:\n" + "\n".join(not_run)


def test_every_docs_page_is_linked_and_every_relative_link_resolves():
    readme = (REPO / "README.md").read_text()
    for page in DOC_PAGES:
        if page.parent.name == "docs":
            assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links {target}, which does not exist"


def test_snippets_use_only_hub_ids_the_test_provides():
    # `from_pretrained("org/name")` and `pipeline(..., model="org/name")`; local folders have no or several slashes.
    loaded = set()
    for blocks in BLOCKS.values():
        for block in blocks:
            if block.language == "python" and block.not_run is None:
                loaded |= set(re.findall(r"""(?:from_pretrained\(|model=)\s*["']([^"'/]+/[^"'/]+)["']""", block.code))
    assert loaded, "no snippet loads a Hub id: the check below would prove nothing"
    assert loaded <= set(HUB_IDS), f"add stand-ins for {sorted(loaded - set(HUB_IDS))} to HUB_IDS"


@pytest.mark.parametrize("page", PAGES_WITH_PYTHON)
def test_python_blocks_run(page, hub_cache, tmp_path):
    blocks = [
        {"page": page, "line": block.line, "code": block.code}
        for block in BLOCKS[page]
        if block.language == "python" and block.not_run is None
    ]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(_RUNNER)
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {
        **os.environ,
        "HF_HOME": str(hub_cache.parent),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "2",
        "MPLBACKEND": "Agg",
    }
    result = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{page}'s python blocks failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
