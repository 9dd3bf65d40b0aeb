"""examples/run_mim.py in one process: BEiT v2 and v1 modes, parquet streaming, exact resume, evaluation, the
non-finite policy, mixed precision of the frozen tokenizer, signals; and the loop helpers of examples/pretraining/loop.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, make_vqkd_tokenizer, mim_args, read_metrics, write_parquet_shards
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import run_mim  # noqa: E402

import pretraining.data as data  # noqa: E402
import pretraining.loop as loop  # noqa: E402
from modeling_beitv2 import (  # noqa: E402
    BeitV2Config,
    BeitV2ForMaskedImageModeling,
    DVAEConfig,
    DVAEModel,
    VQKDConfig,
    VQKDModel,
)
from processing import BeitV2ImageProcessor  # noqa: E402

MIM_KEYS = ("loss", "loss_mim", "loss_aggregation", "mim_accuracy", "aggregation_accuracy", "grad_norm", "lr")


# Every test runs a script in this process, so Accelerate's state must not leak between them.
pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture(scope="module")
def mim_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mim_inputs")
    files = write_parquet_shards(root / "parquet", 12, 2, corrupt=(4,))
    return files, make_vqkd_tokenizer(root / "vqkd")


def patch_model(monkeypatch, change) -> None:
    """Let `change(model)` (e.g. register hooks) act on the model run_mim builds."""
    build_model = run_mim.build_model

    def build_and_change(*args, **kwargs):
        model = build_model(*args, **kwargs)
        change(model)
        return model

    monkeypatch.setattr(run_mim, "build_model", build_and_change)


def test_beitv2_trains_from_parquet_stream_and_saves(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    output_dir = tmp_path / "out"
    extra = ("--max_steps", "4", "--save_steps", "2", "--num_masking_patches", "5")
    state = run_mim.main(mim_args(files, tokenizer, output_dir, *extra))
    assert state["step"] == 4 and state["stop_reason"] is None and not state["preempted"]
    records = read_metrics(output_dir)
    assert len(records) == 4
    for key in (*MIM_KEYS, "images_per_second", "data_wait_fraction"):
        assert all(np.isfinite(record[key]) for record in records), key
    assert all(0 <= record["data_wait_fraction"] <= 1 for record in records)
    # Untrained model, 32 classes: cross-entropy near ln(32) per branch, summed over the two branches.
    assert records[0]["loss"] == pytest.approx(records[0]["loss_mim"] + records[0]["loss_aggregation"], rel=1e-5)
    assert records[0]["loss_mim"] == pytest.approx(np.log(32), abs=0.7)
    assert records[-1]["num_bad_images"] == 1  # the corrupt parquet row, met once in 16 draws from 11 good rows
    assert records[-1]["num_nonfinite_steps"] == 0
    # Every checkpoint is a model folder: it loads with from_pretrained, with its image processor. The tokenizer is
    # frozen and out of it.
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for folder in (output_dir / "checkpoint-2", output_dir):
        model = BeitV2ForMaskedImageModeling.from_pretrained(folder)
        assert model.config.vocab_size == 32 and model.config.use_patch_aggregation
        processor = BeitV2ImageProcessor.from_pretrained(folder)
        assert processor.image_size == 32 and processor.tokenizer_image_size == 32
        assert processor.num_masking_patches == 5  # the exact count wins over the default mask_ratio 0.4
    saved = load_file(output_dir / "checkpoint-4" / "model.safetensors")
    assert not any(key.startswith(("tokenizer", "quantizer", "encoder.")) for key in saved)
    assert processor.pretraining_inputs(np.zeros((40, 40, 3), np.uint8), rng=0)["bool_masked_pos"][0].sum() == 5
    assert (output_dir / "README.md").is_file()


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
    for key in ("loss", "loss_mim", "loss_aggregation", "grad_norm", "lr"):
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
    with pytest.raises(ValueError, match="checkpoint-2"):
        run_mim.main(mim_args(files, tokenizer, output_dir, "--max_steps", "4"))
    # The resumed run replaces the records logged after the checkpoint and clears the interrupted save.
    run_mim.main(mim_args(files, tokenizer, output_dir, "--max_steps", "4", "--resume_from_checkpoint", "latest"))
    assert [record["step"] for record in read_metrics(output_dir)] == [1, 2, 3, 4]
    assert not list(output_dir.glob(".tmp-checkpoint-*"))


def test_beit_v1_mode_with_dvae_tokens(tmp_path, monkeypatch):
    files = write_parquet_shards(tmp_path / "parquet", 8, 1)
    torch.manual_seed(0)
    DVAEModel(DVAEConfig(codebook_size=16, hidden_size=8, num_blocks_per_group=1, image_size=16)).save_pretrained(
        tmp_path / "dvae"
    )
    output_dir = tmp_path / "out"
    args = mim_args(files, tmp_path / "dvae", output_dir, "--max_steps", "2", "--beit_v1")
    args[args.index("--config_overrides") + 1] = TINY_BACKBONE + ",patch_size=16"  # 2x2 grid, as the dVAE's
    implementations = []
    patch_model(monkeypatch, lambda model: implementations.append(model.config._attn_implementation))
    run_mim.main([*args, "--attn_implementation", "eager"])
    assert implementations == ["eager"]
    records = read_metrics(output_dir)
    assert "loss_aggregation" not in records[0]
    assert records[0]["loss"] == pytest.approx(records[0]["loss_mim"], rel=1e-6)
    assert not BeitV2ForMaskedImageModeling.from_pretrained(output_dir).config.use_patch_aggregation
    processor = BeitV2ImageProcessor.from_pretrained(output_dir)
    assert processor.tokenizer_image_size == 16 and processor.tokenizer_interpolation == "lanczos"
    assert list(processor.image_mean) == [0.5, 0.5, 0.5]


def test_tokenizer_and_mode_mismatches_raise(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    with pytest.raises(ValueError, match="--attn_implementation must be one of eager, sdpa"):
        run_mim.main(mim_args(files, tokenizer, tmp_path / "a", "--attn_implementation", "flash"))
    with pytest.raises(ValueError, match="--beit_v1 needs a DVAEModel"):
        run_mim.main(mim_args(files, tokenizer, tmp_path / "a", "--max_steps", "1", "--beit_v1"))
    args = mim_args(files, tokenizer, tmp_path / "b", "--max_steps", "1")
    args[args.index("--config_overrides") + 1] = TINY_BACKBONE + ",patch_size=16"
    with pytest.raises(ValueError, match="patch grid"):
        run_mim.main(args)


def test_push_to_hub_is_checked_before_anything_runs(mim_inputs, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(self, *args, **kwargs):
        raise OSError("Could not reach the Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", offline)
    files, tokenizer = mim_inputs
    with pytest.raises(SystemExit, match="--push_to_hub: cannot use the Hub repo"):
        run_mim.main(mim_args(files, tokenizer, tmp_path / "out", "--max_steps", "1", "--push_to_hub", "--token", "x"))
    assert not (tmp_path / "out").exists()  # nothing was loaded or trained


def test_continuing_a_pretrained_model_applies_drop_path_and_refuses_architecture_changes(
    mim_inputs, tmp_path, monkeypatch
):
    """Fault 5: --model_name_or_path silently ignored --drop_path_rate and --config_overrides."""
    files, tokenizer = mim_inputs
    run_mim.main(mim_args(files, tokenizer, tmp_path / "first", "--max_steps", "1"))
    args = mim_args(files, tokenizer, tmp_path / "second", "--max_steps", "1", "--drop_path_rate", "0.25")
    args[args.index("--config_overrides") : args.index("--config_overrides") + 2] = []
    args[args.index("--config_name") : args.index("--config_name") + 2] = []  # refused with --model_name_or_path
    implementations = []
    patch_model(monkeypatch, lambda model: implementations.append(model.config._attn_implementation))
    run_mim.main([*args, "--model_name_or_path", str(tmp_path / "first"), "--attn_implementation", "eager"])
    assert BeitV2ForMaskedImageModeling.from_pretrained(tmp_path / "second").config.drop_path_rate == 0.25
    assert implementations == ["eager"]
    with pytest.raises(ValueError, match="hidden_size"):
        run_mim.main([*args, "--model_name_or_path", str(tmp_path / "first"), "--config_overrides", "hidden_size=64"])


def test_consecutive_nonfinite_losses_save_and_stop(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    output_dir = tmp_path / "out"
    args = mim_args(files, tokenizer, output_dir, "--max_steps", "10", "--max_consecutive_nonfinite", "3")
    # A negative LayerNorm epsilon larger than any variance makes every forward pass NaN.
    args[args.index("--config_overrides") + 1] = TINY_BACKBONE + ",patch_size=8,layer_norm_eps=-1000.0"
    with pytest.raises(RuntimeError, match="3 consecutive steps had a non-finite loss or gradient"):
        run_mim.main(args)
    assert [path.name for path in output_dir.glob("checkpoint-*")] == ["checkpoint-3"]
    # The loop reports its suspicion, so that rotation keeps the newest checkpoint of sound weights.
    assert json.loads((output_dir / "checkpoint-3" / "checkpoint.json").read_text())["reported_nonfinite_by_caller"]
    records = read_metrics(output_dir)
    assert [record["num_nonfinite_steps"] for record in records] == [1, 2, 3]
    assert "loss" not in records[0] and "grad_norm" not in records[0]  # nothing finite to average
    assert not (output_dir / "model.safetensors").exists()


def test_overflowing_gradient_of_a_finite_loss_is_skipped(mim_inputs, tmp_path, monkeypatch):
    """Fault 1: a finite loss whose gradient overflows was applied and turned the weights NaN; now the update is
    skipped exactly like a non-finite loss's, and counted."""
    files, tokenizer = mim_inputs
    calls = []

    def overflow_on_second_step(grad):
        calls.append(1)
        return grad * float("inf") if len(calls) == 2 else grad

    patch_model(monkeypatch, lambda model: model.lm_head.weight.register_hook(overflow_on_second_step))
    output_dir = tmp_path / "out"
    state = run_mim.main(mim_args(files, tokenizer, output_dir, "--max_steps", "3", "--save_steps", "1"))
    records = read_metrics(output_dir)
    assert np.isfinite(records[1]["loss"])  # the loss was fine: only its gradient overflowed
    assert [record["num_nonfinite_steps"] for record in records] == [0, 1, 1]
    assert state["num_nonfinite_steps"] == 1
    after_first, after_second = (load_file(output_dir / f"checkpoint-{step}" / "model.safetensors") for step in (1, 2))
    for name, value in after_first.items():  # the update of step 2 was skipped entirely
        torch.testing.assert_close(after_second[name], value, rtol=0, atol=0)
    final = load_file(output_dir / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in final.values())
    assert not torch.equal(final["lm_head.weight"], after_second["lm_head.weight"])  # step 3 trained again


def test_gradient_accumulation_consumes_micro_batches(mim_inputs, tmp_path, monkeypatch):
    files, tokenizer = mim_inputs
    drawn = []
    next_batch = loop.MetricsWindow.next_batch
    monkeypatch.setattr(
        loop.MetricsWindow, "next_batch", lambda self, batches: drawn.append(1) or next_batch(self, batches)
    )
    output_dir = tmp_path / "out"
    state = run_mim.main(
        mim_args(files, tokenizer, output_dir, "--max_steps", "2", "--gradient_accumulation_steps", "2")
    )
    assert state["step"] == 2 and len(drawn) == 4  # 2 optimizer steps x 2 micro-batches
    assert [record["step"] for record in read_metrics(output_dir)] == [1, 2]


def test_evaluation_on_a_held_out_split(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    output_dir = tmp_path / "out"
    extra = ("--max_steps", "2", "--do_eval", "--train_val_split", "0.5", "--eval_steps", "1", "--save_steps", "0")
    state = run_mim.main(mim_args(files, tokenizer, output_dir, *extra))
    evaluations = [record for record in read_metrics(output_dir) if "eval_loss" in record]
    assert [record["step"] for record in evaluations] == [1, 2]
    for record in evaluations:
        assert record["eval_loss"] == pytest.approx(record["eval_loss_mim"] + record["eval_loss_aggregation"])
        assert 0 <= record["eval_mim_accuracy"] <= 1 and 0 <= record["eval_aggregation_accuracy"] <= 1
    assert evaluations[0]["eval_loss"] != evaluations[1]["eval_loss"]  # the model changed in between
    assert state["last_metrics"]["eval_loss_mim"] == evaluations[-1]["eval_loss_mim"]


@pytest.mark.parametrize(
    ("flags", "expected_dtype"),
    [
        ((), None),  # no mixed precision: fp32
        (("--bf16",), torch.float16),  # auto: fp16, the precision whose codes agree best with fp32's
        (("--bf16", "--frozen_model_precision", "bf16"), torch.bfloat16),
        (("--bf16", "--frozen_model_precision", "fp32"), None),
    ],
)
def test_frozen_tokenizer_precision(mim_inputs, tmp_path, monkeypatch, flags, expected_dtype):
    files, tokenizer = mim_inputs
    seen = []
    load_tokenizer = run_mim.load_tokenizer

    def load_and_watch(*args, **kwargs):
        loaded = load_tokenizer(*args, **kwargs)

        def record(module, inputs, output):
            enabled = torch.is_autocast_enabled("cpu")
            seen.append(torch.get_autocast_dtype("cpu") if enabled else None)

        loaded.encoder.register_forward_hook(record)
        return loaded

    monkeypatch.setattr(run_mim, "load_tokenizer", load_and_watch)
    run_mim.main(mim_args(files, tokenizer, tmp_path / "out", "--max_steps", "1", "--save_steps", "0", *flags))
    assert seen and all(dtype == expected_dtype for dtype in seen)


def test_frozen_model_precision_is_checked_at_parse_time(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    with pytest.raises(ValueError, match="--frozen_model_precision must be one of auto, fp32, fp16, bf16"):
        run_mim.main(mim_args(files, tokenizer, tmp_path / "out", "--frozen_model_precision", "half"))


def test_loop_syncs_host_and_device_only_at_logging_steps(mim_inputs, tmp_path, monkeypatch):
    """Between two `next(batches)` of non-logging steps the loop never waits for the device (.item(), .tolist(),
    bool(), ...). Syncs inside modeling_beitv2 are the models' business (tested there) and not counted here."""
    files, tokenizer = mim_inputs
    syncs = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if not any("modeling_beitv2" in frame.filename for frame in traceback.extract_stack()):
                syncs.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    at_step_start = []
    next_batch = loop.MetricsWindow.next_batch

    def mark(self, batches):
        at_step_start.append(len(syncs))
        batch = next_batch(self, batches)
        at_step_start[-1] = (at_step_start[-1], len(syncs))  # (before, after) the data loading
        return batch

    monkeypatch.setattr(loop.MetricsWindow, "next_batch", mark)
    extra = ("--max_steps", "5", "--logging_steps", "100", "--save_steps", "0", "--num_masking_patches", "5")
    run_mim.main(mim_args(files, tokenizer, tmp_path / "out", *extra))
    # Syncs made by steps 1-3 (none of them logs): from after one step's data loading to the next step's start.
    per_step = [at_step_start[index + 1][0] - at_step_start[index][1] for index in range(1, 4)]
    assert per_step == [0, 0, 0]


def test_sigterm_on_the_last_step_still_exports(mim_inputs, tmp_path, monkeypatch):
    """Fault 8: a signal during the last step left no exported model; a signal earlier marks the run preempted."""
    files, tokenizer = mim_inputs
    calls = []

    def signal_on_step(step):
        def hook(module, inputs, output):
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signal.SIGTERM)

        return hook

    patch_model(monkeypatch, lambda model: model.register_forward_hook(signal_on_step(3)))
    finished = run_mim.main(mim_args(files, tokenizer, tmp_path / "last", "--max_steps", "3", "--save_steps", "0"))
    assert finished["step"] == 3 and finished["stop_reason"] == "SIGTERM" and not finished["preempted"]
    assert (tmp_path / "last" / "model.safetensors").is_file()

    calls.clear()
    preempted = run_mim.main(mim_args(files, tokenizer, tmp_path / "early", "--max_steps", "9", "--save_steps", "0"))
    assert preempted["step"] == 3 and preempted["stop_reason"] == "SIGTERM" and preempted["preempted"]
    assert (tmp_path / "early" / "checkpoint-3").is_dir() and not (tmp_path / "early" / "model.safetensors").exists()


def test_report_to_tensorboard_writes_events(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    output_dir = tmp_path / "out"
    run_mim.main(
        mim_args(files, tokenizer, output_dir, "--max_steps", "2", "--save_steps", "0", "--report_to", "tensorboard")
    )
    assert list(output_dir.rglob("events.out.tfevents.*"))


@pytest.mark.usefixtures("compile_without_inductor")
def test_torch_compile_matches_eager(mim_inputs, tmp_path):
    files, tokenizer = mim_inputs
    common = ("--max_steps", "2", "--save_steps", "0", "--num_masking_patches", "5")
    run_mim.main(mim_args(files, tokenizer, tmp_path / "eager", *common))
    run_mim.main(mim_args(files, tokenizer, tmp_path / "compiled", *common, "--torch_compile"))
    for eager, compiled in zip(read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled"), strict=True):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# examples/pretraining/loop.py helpers


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def test_image_processor_from_a_config_with_pair_sizes():
    # BeitConfig lets image_size / patch_size be [side, side]; the processor takes the side.
    config = BeitV2Config(
        image_size=[32, 32], patch_size=[8, 8], hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, early_layers=1,
    )  # fmt: skip
    tokenizer = VQKDModel(VQKDConfig.from_preset("tiny-decoder1", image_size=32, codebook_size=16, kmeans_init=False))
    processor = run_mim.build_image_processor(
        config, tokenizer, mask_ratio=0.4, num_masking_patches=None, beit_v1=False
    )
    assert (processor.image_size, processor.patch_size) == (32, 8)


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return loop.build_optimizer(model, 1e-2, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-8)


def test_fused_adamw_matches_the_plain_one():
    fused_model, plain_model = tiny_model(), tiny_model()
    fused = adamw(fused_model)
    assert fused.defaults["fused"] and len(fused.param_groups) == 2  # weight decay off for biases and norms
    plain = torch.optim.AdamW(
        [{"params": group["params"], "weight_decay": group["weight_decay"]} for group in
         adamw(plain_model).param_groups],
        lr=1e-2, betas=(0.9, 0.98), eps=1e-8, foreach=False,
    )  # fmt: skip
    inputs = torch.randn(16, 4)
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    for fused_param, plain_param in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(fused_param, plain_param, rtol=1e-5, atol=1e-6)


def test_nonfinite_guard_skips_the_update_without_a_sync(fresh_accelerator_state):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_model()
    optimizer = adamw(model)
    guard = loop.NonFiniteGuard(accelerator, optimizer)
    before = [param.detach().clone() for param in model.parameters()]
    for step, poison in enumerate((False, True, True, False)):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        if poison:
            next(model.parameters()).grad[0, 0] = float("inf")
        guard.check(loop.gradient_norm(accelerator, model, max_grad_norm=1.0))
        optimizer.step()
        if step == 0:
            before = [param.detach().clone() for param in model.parameters()]
            state_before = {key: value.clone() for key, value in optimizer.state[next(model.parameters())].items()}
        if step == 2:  # two skipped updates: weights, moments and the step count are untouched
            for param, saved in zip(model.parameters(), before, strict=True):
                assert torch.equal(param, saved)
            for key, value in optimizer.state[next(model.parameters())].items():
                assert torch.equal(value, state_before[key]), key
    assert int(guard.num_nonfinite_steps) == 2 and guard.longest_run() == 2
    assert guard.longest_run() == 0  # read again after a finite step: the run is over
    assert all(torch.isfinite(param).all() for param in model.parameters())


def test_slow_input_pipeline_warns_naming_the_workers_flag(tmp_path, caplog, fresh_accelerator_state):
    from accelerate import Accelerator

    window = loop.MetricsWindow(Accelerator(cpu=True), str(tmp_path), num_workers=0)

    def slow_batches():
        while True:
            time.sleep(0.02)
            yield {"pixel_values": torch.zeros(2, 3)}

    batches = slow_batches()
    with caplog.at_level(logging.WARNING, logger="training"):
        for step in (1, 2):
            window.next_batch(batches)
            window.add({"loss": torch.tensor(1.0)})
            record = window.log(step, {})
            assert record["data_wait_fraction"] > 0.5 and record["images_per_second"] > 0
    assert "--dataloader_num_workers" in caplog.text
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_held_out_images_skip_and_log_unreadable_ones(tmp_path, caplog):
    from pretraining.data import load_image_stream

    files = write_parquet_shards(tmp_path / "parquet", 6, 1, corrupt=(2,))
    dataset, column = load_image_stream(data_files=files)
    held_out = data.HeldOutImages(
        dataset, column, lambda image, rng: {"side": image.size[0]}, rank=0, world_size=1, seed=0, max_samples=None
    )
    with caplog.at_level(logging.WARNING, logger="pretraining.data"):
        examples = list(held_out)
    assert len(examples) == 5
    assert "Skipping image" in caplog.text and "1 skipped so far" in caplog.text
