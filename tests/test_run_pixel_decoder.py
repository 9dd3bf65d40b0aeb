"""examples/run_pixel_decoder.py in one process: it beats the mean-patch baseline on the demo's images, exports a
decoder that paints on its own, resumes exactly, and refuses settings that contradict the tokenizer."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_metrics
from safetensors.torch import load_file
from test_pixel_decoder import tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import run_pixel_decoder  # noqa: E402

from demo_pipeline.data import write_demo_dataset  # noqa: E402
from modeling_beitv2 import VQKDModel, VQKDPixelDecoder  # noqa: E402
from pretraining.arguments import resolve_frozen_model_precision  # noqa: E402

TINY_DECODER = "hidden_size=32,num_attention_heads=4,num_hidden_layers=2,intermediate_size=64,refine_channels=8"

# Every test runs the script in this process, so Accelerate's state must not leak between them.
pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The demo's pattern images at 32 px (8 training and 3 validation images per class, 6 classes) and a randomly
    initialised 64-code tokenizer with 8 px patches."""
    root = tmp_path_factory.mktemp("pixel_decoder_inputs")
    folders = write_demo_dataset(root / "data", {"train": 8, "validation": 3}, image_size=32)
    tiny_tokenizer().save_pretrained(root / "vqkd")
    return folders, root / "vqkd"


def decoder_args(inputs, output_dir: Path, *extra: str) -> list[str]:
    folders, tokenizer = inputs
    return [
        "--tokenizer_name_or_path", str(tokenizer),
        "--config_overrides", TINY_DECODER,
        "--train_dir", str(folders["train"]),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "16",
        "--learning_rate", "3e-3",
        "--warmup_steps", "2",
        "--logging_steps", "10",
        "--shuffle_buffer_size", "16",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_beats_the_mean_patch_baseline_on_held_out_demo_images(inputs, tmp_path, monkeypatch):
    folders, tokenizer_dir = inputs
    output_dir = tmp_path / "out"
    baselines = []
    fit_baseline = run_pixel_decoder.fit_baseline
    monkeypatch.setattr(
        run_pixel_decoder, "fit_baseline", lambda *args: baselines.append(fit_baseline(*args)) or baselines[-1]
    )
    extra = ("--max_steps", "40", "--save_steps", "0", "--do_eval", "--validation_dir", str(folders["validation"]))
    state = run_pixel_decoder.main(decoder_args(inputs, output_dir, *extra, "--baseline_images", "30"))
    # --baseline_images caps the training images the baseline averages: 30 of the 48, x 16 patches.
    assert baselines[0].num_patches == 30 * 16
    evaluations = [record for record in read_metrics(output_dir) if "eval_psnr" in record]
    assert [record["step"] for record in evaluations] == [40]
    record = evaluations[0]
    assert record["eval_psnr"] > record["eval_baseline_psnr"] > 0, record
    assert state["last_metrics"]["eval_psnr"] == record["eval_psnr"]
    assert state["last_metrics"]["eval_baseline_psnr"] == record["eval_baseline_psnr"]

    # The export paints on its own: the tokenizer's normalised codebook is inside, the tokenizer is not.
    decoder = VQKDPixelDecoder.from_pretrained(output_dir).eval()
    tokenizer = VQKDModel.from_pretrained(tokenizer_dir).eval()
    assert torch.equal(
        decoder.embeddings.codebook, torch.nn.functional.normalize(tokenizer.quantizer.codebook, dim=-1)
    )
    assert not any(key.startswith(("encoder.", "quantizer.")) for key in load_file(output_dir / "model.safetensors"))
    pixels = decoder.decode(tokenizer.get_codebook_indices(torch.rand(2, 3, 32, 32)))
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= 0 and pixels.max() <= 1
    assert "eval_baseline_psnr" in (output_dir / "README.md").read_text()


def test_resume_continues_exactly(inputs, tmp_path):
    full = tmp_path / "full"
    common = ("--max_steps", "6", "--save_steps", "3", "--logging_steps", "1")
    run_pixel_decoder.main(decoder_args(inputs, full, *common))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    (resumed / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:3])
    )
    state = run_pixel_decoder.main(decoder_args(inputs, resumed, *common, "--resume_from_checkpoint", "latest"))
    assert state["step"] == 6
    full_records, resumed_records = read_metrics(full), read_metrics(resumed)
    assert [record["step"] for record in resumed_records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr"):
        assert [r[key] for r in resumed_records[3:]] == pytest.approx([r[key] for r in full_records[3:]], rel=1e-6)
    final_full, final_resumed = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert final_full.keys() == final_resumed.keys()
    for key, value in final_full.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=1e-5, atol=1e-6)


def test_settings_that_contradict_the_tokenizer_are_refused(inputs, tmp_path):
    with pytest.raises(ValueError, match=r"patch_size=16 \(tokenizer: 8\)"):
        run_pixel_decoder.main(
            decoder_args(inputs, tmp_path / "a", "--max_steps", "1", "--config_overrides", "patch_size=16")
        )
    with pytest.raises(ValueError, match="hidden_sizes"):
        run_pixel_decoder.main(
            decoder_args(inputs, tmp_path / "b", "--max_steps", "1", "--config_overrides", "hidden_sizes=32")
        )
    with pytest.raises(ValueError, match="--baseline_images"):
        run_pixel_decoder.main(decoder_args(inputs, tmp_path / "c", "--max_steps", "1", "--baseline_images", "0"))


def test_frozen_model_precision_follows_the_run():
    # A tokenizer's codes: fp16 under any mixed precision. A teacher's continuous targets: the run's own precision.
    assert resolve_frozen_model_precision("auto", "no", "tokenizer") == "fp32"
    assert resolve_frozen_model_precision("auto", "bf16", "tokenizer") == "fp16"
    assert resolve_frozen_model_precision("bf16", "no", "tokenizer") == "bf16"
    assert resolve_frozen_model_precision("auto", "no", "teacher") == "fp32"
    assert resolve_frozen_model_precision("auto", "bf16", "teacher") == "bf16"
    assert resolve_frozen_model_precision("auto", "fp16", "teacher") == "fp16"
    assert resolve_frozen_model_precision("fp32", "bf16", "teacher") == "fp32"
    with pytest.raises(ValueError, match="--frozen_model_precision must be one of auto, fp32, fp16, bf16"):
        resolve_frozen_model_precision("half", "no", "teacher")
