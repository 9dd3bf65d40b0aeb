"""examples/run_mim.py in one process: BEiT v2 and v1 modes, parquet streaming, exact resume, non-finite losses."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_metrics
from safetensors.torch import load_file
from test_data import write_parquet_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import run_mim  # noqa: E402

from modeling_beitv2 import (  # noqa: E402
    BeitV2ForMaskedImageModeling,
    DVAEConfig,
    DVAEModel,
    VQKDConfig,
    VQKDModel,
)
from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config  # noqa: E402
from processing import BeitV2ImageProcessor  # noqa: E402

TINY_BACKBONE = (
    "hidden_size=32,num_attention_heads=2,intermediate_size=64,num_hidden_layers=2,early_layers=1,head_layers=1"
)
VIT_TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1)


def make_vqkd_tokenizer(path: Path) -> Path:
    """A randomly initialised 32 px / patch 8 VQ-KD tokenizer with 32 codes (labels only need to be deterministic);
    its codebook is random unit vectors, as a tokenizer waiting for its k-means init refuses to tokenize."""
    torch.manual_seed(0)
    config = VQKDConfig(
        encoder_config=vqkd_encoder_config("tiny", image_size=32, patch_size=8, **VIT_TINY),
        decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=4, **VIT_TINY),
        num_codes=32,
        teacher_dim=16,
        kmeans_init=False,
    )
    VQKDModel(config).save_pretrained(path)
    return path


# Every test runs a script in this process, so Accelerate's state must not leak between them.
pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture(scope="module")
def mim_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mim_inputs")
    files = write_parquet_shards(root / "parquet", 12, 2, corrupt=(4,))
    return files, make_vqkd_tokenizer(root / "vqkd")


def mim_args(files: list[str], tokenizer: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--tokenizer_name_or_path", str(tokenizer),
        "--config_name", "tiny",
        "--config_overrides", TINY_BACKBONE + ",patch_size=8",
        "--image_size", "32",
        "--data_files", *files,
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--shuffle_buffer_size", "5",
        *extra,
    ]  # fmt: skip


def test_beitv2_trains_from_parquet_stream_and_saves(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    output_dir = tmp_path / "out"
    extra = ("--max_steps", "4", "--save_steps", "0", "--num_masking_patches", "5")
    state = run_mim.main(mim_args(files, tokenizer, output_dir, *extra))
    assert state["step"] == 4
    records = read_metrics(output_dir)
    assert len(records) == 4
    for key in ("loss", "loss_1", "loss_2", "mlm_acc_1", "mlm_acc_2", "grad_norm", "lr", "images_per_second"):
        assert all(np.isfinite(record[key]) for record in records), key
    # Untrained model, 32 classes: cross-entropy near ln(32) per branch, summed over the two branches.
    assert records[0]["loss"] == pytest.approx(records[0]["loss_1"] + records[0]["loss_2"], rel=1e-5)
    assert records[0]["loss_1"] == pytest.approx(np.log(32), abs=0.7)
    assert records[-1]["num_bad_images"] == 1  # the corrupt parquet row, met once in 16 draws from 11 good rows
    # The tokenizer is frozen and out of the checkpoint; only the MIM model's weights are there.
    assert [path.name for path in output_dir.glob("checkpoint-*")] == ["checkpoint-4"]
    saved = load_file(output_dir / "checkpoint-4" / "model.safetensors")
    assert not any(key.startswith(("tokenizer", "quantizer", "encoder.")) for key in saved)
    model = BeitV2ForMaskedImageModeling.from_pretrained(output_dir)
    assert model.config.vocab_size == 32 and model.config.use_patch_aggregation
    processor = BeitV2ImageProcessor.from_pretrained(output_dir)
    assert processor.tokenizer_pixel_mapping == "minus_one_to_one" and processor.image_size == 32
    assert processor.num_masking_patches == 5  # the exact count wins over the default mask_ratio 0.4 (6 of 16)
    assert processor(np.zeros((40, 40, 3), np.uint8))["bool_masked_pos"][0].sum() == 5


def test_resume_continues_exactly_with_drop_path(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    common = ("--max_steps", "6", "--save_steps", "2", "--drop_path_rate", "0.2")
    full = tmp_path / "full"
    run_mim.main(mim_args(files, tokenizer, full, *common))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    run_mim.main(
        mim_args(files, tokenizer, resumed, *common, "--resume_from_checkpoint", str(resumed / "checkpoint-4"))
    )
    full_records, resumed_records = read_metrics(full), read_metrics(resumed)
    assert [record["step"] for record in resumed_records] == [5, 6]
    for key in ("loss", "loss_1", "loss_2", "grad_norm", "lr"):
        assert [r[key] for r in resumed_records] == pytest.approx([r[key] for r in full_records[4:]], rel=1e-6)


def test_output_dir_bookkeeping_across_runs(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    output_dir = tmp_path / "out"
    run_mim.main(mim_args(files, tokenizer, output_dir, "--max_steps", "4", "--save_steps", "2"))
    # Killed after step 4 with its last complete checkpoint at 2, in the middle of another save.
    shutil.rmtree(output_dir / "checkpoint-4")
    (output_dir / ".tmp-checkpoint-3").mkdir()
    with (output_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 5, "lo')  # a record cut short by the kill
    # A fresh run would rotate away its own checkpoints (the old ones have higher steps): refused.
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-2\)"):
        run_mim.main(mim_args(files, tokenizer, output_dir, "--max_steps", "4"))
    # Resuming on another number of processes is refused too (each rank owns its stream position and RNG).
    state_file = output_dir / "checkpoint-2" / "training_state_rank0.json"
    saved = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**saved, "loop": {**saved["loop"], "num_processes": 2}}))
    with pytest.raises(ValueError, match="written by 2 processes but 1 are running"):
        run_mim.main(mim_args(files, tokenizer, output_dir, "--max_steps", "4", "--resume_from_checkpoint", "latest"))
    state_file.write_text(json.dumps(saved))
    # The resumed run replaces the records logged after the checkpoint and clears the interrupted save.
    run_mim.main(mim_args(files, tokenizer, output_dir, "--max_steps", "4", "--resume_from_checkpoint", "latest"))
    assert [record["step"] for record in read_metrics(output_dir)] == [1, 2, 3, 4]
    assert not list(output_dir.glob(".tmp-checkpoint-*"))


def test_beit_v1_mode_with_dvae_tokens(tmp_path):
    files = write_parquet_shards(tmp_path / "parquet", 8, 1)
    torch.manual_seed(0)
    DVAEModel(DVAEConfig(vocab_size=16, hidden_size=8, num_blocks_per_group=1, image_size=16)).save_pretrained(
        tmp_path / "dvae"
    )
    output_dir = tmp_path / "out"
    args = mim_args(files, tmp_path / "dvae", output_dir, "--max_steps", "2", "--beit_v1")
    args[args.index("--config_overrides") + 1] = TINY_BACKBONE + ",patch_size=16"  # 2x2 grid, as the dVAE's
    run_mim.main(args)
    records = read_metrics(output_dir)
    assert "loss_2" not in records[0] and records[0]["loss"] == pytest.approx(records[0]["loss_1"], rel=1e-6)
    assert not BeitV2ForMaskedImageModeling.from_pretrained(output_dir).config.use_patch_aggregation
    processor = BeitV2ImageProcessor.from_pretrained(output_dir)
    assert processor.tokenizer_pixel_mapping == "dalle" and processor.tokenizer_image_size == 16
    assert list(processor.image_mean) == [0.5, 0.5, 0.5]


def test_tokenizer_and_mode_mismatches_raise(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    with pytest.raises(ValueError, match="--beit_v1 needs a DVAEModel"):
        run_mim.main(mim_args(files, tokenizer, tmp_path / "a", "--max_steps", "1", "--beit_v1"))
    args = mim_args(files, tokenizer, tmp_path / "b", "--max_steps", "1")
    args[args.index("--config_overrides") + 1] = TINY_BACKBONE + ",patch_size=16"
    with pytest.raises(ValueError, match="patch grid"):
        run_mim.main(args)


def test_consecutive_nonfinite_losses_save_and_stop(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    output_dir = tmp_path / "out"
    args = mim_args(files, tokenizer, output_dir, "--max_steps", "10", "--max_consecutive_nonfinite", "3")
    # A negative LayerNorm epsilon larger than any variance makes every forward pass NaN.
    args[args.index("--config_overrides") + 1] = TINY_BACKBONE + ",patch_size=8,layer_norm_eps=-1000.0"
    with pytest.raises(RuntimeError, match="3 consecutive steps had a non-finite loss"):
        run_mim.main(args)
    assert [path.name for path in output_dir.glob("checkpoint-*")] == ["checkpoint-3"]
    records = read_metrics(output_dir)
    assert [record["num_nonfinite_steps"] for record in records] == [1, 2, 3]
    assert "loss" not in records[0]  # nothing finite to average
    assert not (output_dir / "model.safetensors").exists()


def test_gradient_accumulation_consumes_micro_batches(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    output_dir = tmp_path / "out"
    args = mim_args(
        files, tokenizer, output_dir, "--max_steps", "2", "--gradient_accumulation_steps", "2", "--log_example_ids"
    )
    state = run_mim.main(args)
    assert state["step"] == 2
    # 2 optimizer steps x 2 micro-batches x 4 images.
    assert len((output_dir / "example_ids_rank0.txt").read_text().split()) == 16
    assert [record["step"] for record in read_metrics(output_dir)] == [1, 2]
