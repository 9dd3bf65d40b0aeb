"""examples/run_vqkd.py in one process: training, logging, checkpoints, exact resume, evaluation, frozen teacher."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder, make_teacher, read_metrics, vqkd_args
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import run_vqkd  # noqa: E402

from modeling_beitv2 import VQKDModel  # noqa: E402

VQKD_KEYS = (
    "loss", "loss_reconstruction", "loss_quantization", "perplexity", "codebook_usage", "num_dead_codes", "lr",
    "images_per_second", "data_wait_fraction",
)  # fmt: skip


# Every test runs a script in this process, so Accelerate's state must not leak between them.
pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture(scope="module")
def vqkd_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqkd_inputs")
    return make_image_folder(root / "images"), make_teacher(root / "teacher")


def test_trains_logs_codebook_statistics_and_saves(vqkd_inputs, tmp_path):
    images, teacher = vqkd_inputs
    output_dir = tmp_path / "out"
    state = run_vqkd.main(
        vqkd_args(images, teacher, output_dir, "--max_steps", "5", "--save_steps", "2", "--save_total_limit", "2")
    )
    assert state["step"] == 5 and state["stop_reason"] is None
    records = read_metrics(output_dir)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5]
    for key in VQKD_KEYS:
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
    for tensors in (output_dir / "checkpoint-5").glob("*.safetensors"):  # model, optimizer, RNG states
        assert not any("teacher" in key for key in load_file(tensors)), tensors.name
    # The final export and every checkpoint load with from_pretrained: the tokenizer follows the teacher (feature
    # size 16, patch 8 at 32 px -> 4x4 grid).
    for folder in (output_dir, output_dir / "checkpoint-4"):
        model = VQKDModel.from_pretrained(folder)
        assert model.config.teacher_dim == 16 and tuple(model.config.patch_grid) == (4, 4)
        # The saved processor gives the plain [0, 1] pixels the tokenizer maps itself.
        saved_processor = json.loads((folder / "preprocessor_config.json").read_text())
        assert saved_processor["image_mean"] == [0.0] * 3 and saved_processor["image_std"] == [1.0] * 3
    assert (output_dir / "README.md").is_file()


def test_teacher_sees_the_tokenizers_plain_pixels():
    # Tokenizer and teacher read the same [0, 1] view; each applies its own normalisation.
    pixels = torch.rand(2, 3, 8, 8).half()
    seen = []
    run_vqkd.teacher_targets(lambda images: seen.append(images) or images, pixels)
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], pixels.float())


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
    for key in ("loss", "loss_reconstruction", "loss_quantization", "perplexity", "lr"):
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
    with pytest.raises(ValueError, match="--config_name .huge. is neither a preset"):
        run_vqkd.main(vqkd_args(images, teacher, tmp_path / "c", "--max_steps", "1", "--config_name", "huge"))


def test_evaluation_on_a_validation_folder(vqkd_inputs, tmp_path):
    images, teacher = vqkd_inputs
    validation = make_image_folder(tmp_path / "validation", num_images=5, corrupt=False)
    output_dir = tmp_path / "out"
    extra = ("--max_steps", "2", "--do_eval", "--validation_dir", str(validation), "--save_steps", "0")
    state = run_vqkd.main(vqkd_args(images, teacher, output_dir, *extra))
    evaluations = [record for record in read_metrics(output_dir) if "eval_reconstruction_cosine" in record]
    assert [record["step"] for record in evaluations] == [2]  # without --eval_steps: at the end
    record = evaluations[0]
    assert -1 <= record["eval_reconstruction_cosine"] <= 1 and np.isfinite(record["eval_loss_quantization"])
    # 6 images x 16 patches (5 + the RGBA one) spread over 32 codes: at least one used, at most all of them.
    assert 1 / 32 <= record["eval_codebook_usage"] <= 1 and 1 <= record["eval_perplexity"] <= 32
    assert state["last_metrics"]["eval_codebook_usage"] == record["eval_codebook_usage"]


@pytest.mark.usefixtures("compile_without_inductor")
def test_torch_compile_and_frozen_teacher_autocast(vqkd_inputs, tmp_path, monkeypatch):
    """--torch_compile compiles the tokenizer and the teacher's forward; with --bf16 the teacher runs under autocast."""
    images, teacher = vqkd_inputs
    under_autocast = []
    from_pretrained = run_vqkd.TeacherForPatchTargets.from_pretrained

    def load_and_watch(*args, **kwargs):
        loaded = from_pretrained(*args, **kwargs)
        loaded.register_forward_pre_hook(
            lambda module, inputs: under_autocast.append(torch.is_autocast_enabled("cpu"))
        )
        return loaded

    monkeypatch.setattr(run_vqkd.TeacherForPatchTargets, "from_pretrained", load_and_watch)
    common = ("--max_steps", "2", "--save_steps", "0", "--bf16")
    run_vqkd.main(vqkd_args(images, teacher, tmp_path / "eager", *common))
    assert under_autocast and all(under_autocast)
    run_vqkd.main(vqkd_args(images, teacher, tmp_path / "compiled", *common, "--torch_compile"))
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=2e-2)  # bf16 kernels differ


def test_arguments_from_yaml_and_json_files(tmp_path):
    import yaml

    from pretraining.arguments import DataArguments, parse_arguments

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
        assert training_args.warmup_steps == 0.05 and data_args.streaming is True
