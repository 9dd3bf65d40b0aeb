"""examples/run_vqkd.py in one process: training, logging, checkpoints, exact resume, frozen teacher."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import read_metrics
from safetensors.torch import load_file
from test_data import png_bytes
from transformers import ViTConfig, ViTModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import run_vqkd  # noqa: E402

from modeling_beitv2 import VQKDModel  # noqa: E402

TINY_TOKENIZER = "hidden_size=32,num_attention_heads=2,intermediate_size=64,num_hidden_layers=2,num_codes=32"


def make_image_folder(root: Path, num_images: int = 10, corrupt: bool = True) -> Path:
    """Random 40x48 images in an imagefolder layout, one RGBA image and (optionally) one truncated PNG."""
    folder = root / "train" / "things"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(num_images):
        PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")
    PIL.Image.new("RGBA", (36, 36), (10, 200, 30, 128)).save(folder / "rgba.png")
    if corrupt:
        (folder / "truncated.png").write_bytes(png_bytes(1, size=(32, 32))[:30])
    return root


def make_teacher(path: Path, patch_size: int = 8, hidden_size: int = 16) -> Path:
    config = ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=patch_size,
    )
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(path)
    return path


# Every test runs a script in this process, so Accelerate's state must not leak between them.
pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture(scope="module")
def vqkd_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqkd_inputs")
    return make_image_folder(root / "images"), make_teacher(root / "teacher")


def vqkd_args(images: Path, teacher: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--teacher_name_or_path", str(teacher),
        "--config_name", "tiny",
        "--config_overrides", TINY_TOKENIZER + ",decoder.num_hidden_layers=1",
        "--image_size", "32",
        "--train_dir", str(images),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "3",
        "--learning_rate", "1e-3",
        "--warmup_steps", "2",
        "--logging_steps", "1",
        "--shuffle_buffer_size", "4",
        *extra,
    ]  # fmt: skip


def test_trains_logs_codebook_statistics_and_saves(vqkd_inputs, tmp_path):
    images, teacher = vqkd_inputs
    output_dir = tmp_path / "out"
    state = run_vqkd.main(
        vqkd_args(images, teacher, output_dir, "--max_steps", "5", "--save_steps", "2", "--save_total_limit", "2")
    )
    assert state["step"] == 5 and not state["stopped_early"]
    records = read_metrics(output_dir)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5]
    for key in ("loss", "rec_loss", "quant_loss", "perplexity", "codebook_usage", "dead_codes", "lr"):
        assert all(np.isfinite(record[key]) for record in records), key
    assert records[0]["lr"] < records[1]["lr"]  # linear warmup over 2 steps, then cosine down
    assert records[-1]["lr"] < records[1]["lr"]
    # 5 steps x 3 images go through the 12-file folder more than once: the truncated file was met and skipped,
    # the RGBA one converted.
    assert records[-1]["num_bad_images"] >= 1 and records[-1]["num_converted_images"] >= 1
    # Rotation keeps the newest two checkpoints, the final one included; no temporary folder survives.
    assert sorted(path.name for path in output_dir.iterdir() if "checkpoint" in path.name) == [
        "checkpoint-4",
        "checkpoint-5",
    ]
    # The teacher is in no checkpoint: only the tokenizer's own weights are saved.
    saved = load_file(output_dir / "checkpoint-5" / "model.safetensors")
    assert not any("teacher" in key for key in saved) and any(key.startswith("quantizer.") for key in saved)
    assert sorted(p.name for p in (output_dir / "checkpoint-5").glob("*.safetensors")) == ["model.safetensors"]
    # The final export: the tokenizer follows the teacher (feature size 16, patch 8 at 32 px -> 4x4 grid).
    model = VQKDModel.from_pretrained(output_dir)
    assert model.config.teacher_dim == 16 and tuple(model.config.patch_grid) == (4, 4)
    assert (output_dir / "preprocessor_config.json").is_file() and (output_dir / "README.md").is_file()


def test_resume_continues_exactly(vqkd_inputs, tmp_path):
    images, teacher = vqkd_inputs
    full = tmp_path / "full"
    run_vqkd.main(vqkd_args(images, teacher, full, "--max_steps", "6", "--save_steps", "3"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    (resumed / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:3])
    )
    state = run_vqkd.main(
        vqkd_args(
            images, teacher, resumed, "--max_steps", "6", "--save_steps", "3", "--resume_from_checkpoint", "latest"
        )
    )
    assert state["step"] == 6
    full_records, resumed_records = read_metrics(full), read_metrics(resumed)
    assert [record["step"] for record in resumed_records] == [1, 2, 3, 4, 5, 6]  # appended to the old file
    for key in ("loss", "rec_loss", "quant_loss", "perplexity", "lr"):
        assert [r[key] for r in resumed_records[3:]] == pytest.approx([r[key] for r in full_records[3:]], rel=1e-6)
    final_full = load_file(full / "model.safetensors")
    final_resumed = load_file(resumed / "model.safetensors")
    for key, value in final_full.items():  # weights AND the EMA codebook buffers
        torch.testing.assert_close(final_resumed[key], value, rtol=1e-5, atol=1e-6)


def test_teacher_mismatch_and_bad_overrides_raise(vqkd_inputs, tmp_path):
    images, teacher = vqkd_inputs
    with pytest.raises(ValueError, match="not a multiple of the teacher's patch size"):
        run_vqkd.main(vqkd_args(images, teacher, tmp_path / "a", "--max_steps", "1", "--image_size", "36"))
    with pytest.raises(ValueError, match="key=value"):
        run_vqkd.main(vqkd_args(images, teacher, tmp_path / "b", "--max_steps", "1", "--config_overrides", "oops"))
    with pytest.raises(ValueError, match="Unknown --config_name"):
        run_vqkd.main(vqkd_args(images, teacher, tmp_path / "c", "--max_steps", "1", "--config_name", "huge"))


def test_arguments_from_yaml_and_json_files(tmp_path):
    import yaml
    from training import DataArguments, parse_arguments, parse_config_overrides

    settings = {
        "teacher_name_or_path": "some/teacher",
        "train_dir": "images",
        "output_dir": "out",
        "max_steps": 7,
        "config_overrides": "hidden_size=32,kmeans_init=false,decay=0.9",
    }
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(settings))
    (tmp_path / "args.json").write_text(json.dumps(settings))
    classes = (run_vqkd.VQKDModelArguments, DataArguments, run_vqkd.VQKDTrainingArguments)
    for name in ("args.yaml", "args.json"):
        model_args, data_args, training_args = parse_arguments(classes, [str(tmp_path / name)])
        assert model_args.teacher_name_or_path == "some/teacher" and data_args.train_dir == "images"
        # The paper's VQ-KD recipe is the default: betas (0.9, 0.99), weight decay 1e-4, 5% warmup, no clipping.
        assert training_args.max_steps == 7 and training_args.adam_beta2 == 0.99
        assert training_args.weight_decay == 1e-4 and training_args.max_grad_norm is None
        assert data_args.streaming is True
    assert parse_config_overrides(settings["config_overrides"]) == {
        "hidden_size": 32,
        "kmeans_init": False,
        "decay": 0.9,
    }
