"""examples/pretraining/checkpoints.py: save, load, the output folder, pickle-free state files, RNG and DeepSpeed states:
exact resume, no pickle, rotation that keeps the last finite weights, abandoned branches moved aside, clear errors on
a failed write, and today's output-folder guarantees."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from conftest import EXAMPLES_DIR, REPO_ROOT, free_port
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, get_cosine_schedule_with_warmup

import pretraining.checkpoints as checkpoints
from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling
from pretraining.checkpoints import (
    CheckpointWriteError,
    list_checkpoints,
    load_checkpoint,
    prepare_output_dir,
    resolve_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from processing import BeitV2ImageProcessor

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state", "one_thread")


@pytest.fixture
def one_thread():
    """These models are tiny: a second intra-op thread only adds contention on a busy 2-core machine (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_BEITV2 = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    vocab_size=16,
    early_layers=1,
    head_layers=1,
)


def tiny_bert() -> BertForMaskedLM:
    """A 1-layer BERT whose output embedding is tied to the input one (save_pretrained stores it once)."""
    config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    return BertForMaskedLM(config)


def prepared(model: torch.nn.Module, lr: float = 1e-2):
    """A CPU Accelerator, and the model with AdamW and a warmup-cosine LambdaLR (not prepared, as in the scripts)."""
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, scheduler


def save(accelerator, output_dir, step, model, optimizer, scheduler, **kwargs) -> Path:
    kwargs.setdefault("loop_state", {"step": step})
    kwargs.setdefault("dataloader_state", {"position": step})
    return save_checkpoint(
        accelerator, output_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, **kwargs
    )


def write_metrics(output_dir: Path, steps: range, tail: str = "") -> None:
    lines = "".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in steps)
    (output_dir / "metrics.jsonl").write_text(lines + tail)


# ---------------------------------------------------------------------------------------------------------------
# Exact resume


def mim_step(model, batch_index: int) -> torch.Tensor:
    """One MIM loss on a batch determined by its index, plus augmentation noise from python, numpy and torch RNGs
    (as a data pipeline draws them); dropout and drop path draw from the torch RNG too."""
    data = torch.Generator().manual_seed(batch_index)
    pixel_values = torch.randn(2, 3, 16, 16, generator=data)
    pixel_values = pixel_values + random.random() + float(np.random.rand()) + 0.1 * torch.randn(1)
    bool_masked_pos = torch.zeros(2, 4, dtype=torch.bool)
    bool_masked_pos[:, torch.randperm(4, generator=data)[:2]] = True
    labels = torch.randint(0, 16, (2, 4), generator=data)
    return model(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, labels=labels).loss


def train_steps(accelerator, model, optimizer, scheduler, steps: range) -> list[float]:
    losses = []
    model.train()
    for step in steps:
        loss = mim_step(model, step)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def build_mim_run(seed: int):
    torch.manual_seed(seed)
    config = BeitV2Config(**{**TINY_BEITV2, "image_size": 16}, drop_path_rate=0.2, hidden_dropout_prob=0.1)
    return prepared(BeitV2ForMaskedImageModeling(config))


def resume_mim_run(checkpoint: Path, restore_rng: bool):
    """A new process's view: other initial weights and RNG states, then the checkpoint."""
    random.seed(123)
    np.random.seed(123)
    accelerator, model, optimizer, scheduler = build_mim_run(seed=123)
    loop_state, dataloader_state = load_checkpoint(
        accelerator, checkpoint, model=model, optimizer=optimizer, scheduler=scheduler
    )
    torch.randn(3)  # the loop creates its DataLoader iterator here, which draws from the torch RNG
    if restore_rng:
        restore_rng_states(accelerator, checkpoint)
    return accelerator, model, optimizer, scheduler, loop_state, dataloader_state


def test_resume_is_bit_exact_and_every_checkpoint_is_a_pretrained_folder(tmp_path):
    random.seed(0)
    np.random.seed(0)
    accelerator, model, optimizer, scheduler = build_mim_run(seed=0)
    processor = BeitV2ImageProcessor(image_size=32, patch_size=8, num_masking_patches=6)
    train_steps(accelerator, model, optimizer, scheduler, range(1, 3))
    checkpoint = save(
        accelerator,
        tmp_path,
        2,
        model,
        optimizer,
        scheduler,
        loop_state={"step": 2, "history": (1, 2), "counts": {0: 5}},
        dataloader_state={"position": 2, "shards": ["a", "b"]},
        image_processor=processor,
    )
    expected_losses = train_steps(accelerator, model, optimizer, scheduler, range(3, 5))
    expected_weights = {name: value.clone() for name, value in model.state_dict().items()}

    accelerator, model, optimizer, scheduler, loop_state, dataloader_state = resume_mim_run(checkpoint, True)
    assert loop_state == {"step": 2, "history": (1, 2), "counts": {0: 5}}  # tuples and int keys come back exactly
    assert dataloader_state == {"position": 2, "shards": ["a", "b"]}
    assert isinstance(optimizer.param_groups[0]["betas"], tuple)
    assert scheduler.last_epoch == 2
    assert train_steps(accelerator, model, optimizer, scheduler, range(3, 5)) == expected_losses
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected_weights[name]), name

    # The test sees the RNG: without restoring it the continuation differs.
    accelerator, model, optimizer, scheduler, *_ = resume_mim_run(checkpoint, False)
    assert train_steps(accelerator, model, optimizer, scheduler, range(3, 5)) != expected_losses

    # Safetensors and JSON (plus the Hub custom code save_pretrained copies, imported only with trust_remote_code);
    # the folder is a complete from_pretrained folder with the processor.
    assert {path.suffix for path in checkpoint.iterdir()} == {".json", ".safetensors", ".py"}
    loaded = BeitV2ForMaskedImageModeling.from_pretrained(checkpoint)
    saved = load_file(checkpoint / "model.safetensors")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert BeitV2ImageProcessor.from_pretrained(checkpoint).num_masking_patches == 6


def test_rng_states_round_trip(tmp_path):
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    checkpoint = save(accelerator, tmp_path, 1, model, optimizer, scheduler)
    expected = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    restore_rng_states(accelerator, checkpoint)
    assert (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()) == expected


def test_cuda_rng_states_follow_the_device_count(tmp_path, monkeypatch):
    """Every device's CUDA state when the device count matches, else this rank's device only (faked CUDA)."""
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    saved_states = [torch.full((16,), index, dtype=torch.uint8) for index in range(2)]
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved_states)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(("all", states)))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((device, state)))
    checkpoint = save(accelerator, tmp_path, 1, model, optimizer, scheduler)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    restore_rng_states(accelerator, checkpoint)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    restore_rng_states(accelerator, checkpoint)
    (kind, states), (device, state) = calls
    assert kind == "all" and [s.tolist() for s in states] == [s.tolist() for s in saved_states]
    assert device == 1 and torch.equal(state, saved_states[1])


def test_grad_scaler_state_round_trips_and_may_be_dropped(tmp_path):
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    accelerator.scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    checkpoint = save(accelerator, tmp_path, 1, model, optimizer, scheduler)
    accelerator.scaler.update(new_scale=8.0)
    load_checkpoint(accelerator, checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
    assert accelerator.scaler.get_scale() == 256.0
    accelerator.scaler = None  # resumed in bf16, the usual cure for fp16 overflows
    load_checkpoint(accelerator, checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)


def test_tied_weights_load_back_and_a_foreign_model_is_refused(tmp_path):
    torch.manual_seed(0)
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    checkpoint = save(accelerator, tmp_path, 1, model, optimizer, scheduler)
    assert "cls.predictions.decoder.weight" not in load_file(checkpoint / "model.safetensors")  # stored once
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    torch.manual_seed(1)
    fresh = tiny_bert()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), betas=(0.9, 0.98), weight_decay=0.05)
    load_checkpoint(accelerator, checkpoint, model=fresh, optimizer=fresh_optimizer, scheduler=scheduler)
    assert fresh.cls.predictions.decoder.weight is fresh.bert.embeddings.word_embeddings.weight
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected[name]), name
    foreign = BeitV2ForMaskedImageModeling(BeitV2Config(**TINY_BEITV2))
    with pytest.raises(ValueError, match=r"do not fit the model \(BeitV2ForMaskedImageModeling\): missing"):
        load_checkpoint(accelerator, checkpoint, model=foreign, optimizer=optimizer, scheduler=scheduler)


# ---------------------------------------------------------------------------------------------------------------
# Fault 1: a non-finite stop never rotates away the last finite checkpoint


def test_nonfinite_checkpoints_never_rotate_away_the_newest_finite_one(tmp_path, caplog):
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    kwargs = {"save_total_limit": 1}
    save(accelerator, tmp_path, 1, model, optimizer, scheduler, **kwargs)
    save(accelerator, tmp_path, 2, model, optimizer, scheduler, weights_are_finite=False, **kwargs)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.bias[0] = float("nan")  # the caller did not notice; the save does
    save(accelerator, tmp_path, 3, model, optimizer, scheduler, **kwargs)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-3"]
    info = json.loads((tmp_path / "checkpoint-3" / "checkpoint.json").read_text())
    assert not info["weights_are_finite"] and info["nonfinite_parameters"] == ["bert.embeddings.LayerNorm.bias"]

    # `latest` is the newest checkpoint; resuming a non-finite one warns and names the finite alternative.
    latest = resolve_checkpoint("latest", tmp_path)
    assert latest.name == "checkpoint-3"
    with caplog.at_level(logging.WARNING, logger="checkpointing"):
        load_checkpoint(accelerator, latest, model=model, optimizer=optimizer, scheduler=scheduler)
    assert "RESUMING FROM A NON-FINITE CHECKPOINT" in caplog.text
    assert "bert.embeddings.LayerNorm.bias" in caplog.text and str(tmp_path / "checkpoint-1") in caplog.text

    with torch.no_grad():
        model.bert.embeddings.LayerNorm.bias[0] = 0.0
    save(accelerator, tmp_path, 4, model, optimizer, scheduler, **kwargs)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-4"]


# ---------------------------------------------------------------------------------------------------------------
# Fault 2: a rewind never mixes runs


def test_rewind_moves_the_abandoned_branch_and_its_metrics_aside(tmp_path, caplog):
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    for step in (100, 200, 300):
        save(accelerator, tmp_path, step, model, optimizer, scheduler)
    write_metrics(tmp_path, range(100, 301, 100), tail='{"step": 31')  # killed while writing a record
    with caplog.at_level(logging.WARNING, logger="pretraining.checkpoints"):
        prepare_output_dir(accelerator, tmp_path, tmp_path / "checkpoint-100")
    assert "checkpoint-200, checkpoint-300" in caplog.text
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-100"]
    (abandoned,) = tmp_path.glob("abandoned-*")
    assert sorted(path.name for path in abandoned.iterdir()) == ["checkpoint-200", "checkpoint-300", "metrics.jsonl"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [100]
    assert (abandoned / "metrics.jsonl").read_text().splitlines()[-1] == '{"step": 31'
    assert load_checkpoint(accelerator, abandoned / "checkpoint-300", model=model, optimizer=optimizer,
                           scheduler=scheduler)[0] == {"step": 300}  # fmt: skip

    # The resumed run's next checkpoint is what `latest` and rotation see.
    save(accelerator, tmp_path, 200, model, optimizer, scheduler, save_total_limit=1)
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-200"] == [resolve_checkpoint("latest", tmp_path)]

    # A second rewind in the same second gets its own folder.
    save(accelerator, tmp_path, 300, model, optimizer, scheduler)
    prepare_output_dir(accelerator, tmp_path, tmp_path / "checkpoint-200")
    prepare_output_dir(accelerator, tmp_path, tmp_path / "checkpoint-200")  # nothing left to move: no folder
    assert len(list(tmp_path.glob("abandoned-*"))) == 2


# ---------------------------------------------------------------------------------------------------------------
# Fault 3: loading never unpickles


class _Exploit:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_unpickles_anything_in_the_folder(tmp_path):
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    checkpoint = save(accelerator, tmp_path / "out", 1, model, optimizer, scheduler)
    marker = tmp_path / "code_ran"
    # Planted under every name Accelerate's save_state/load_state and torch.save users read, in torch.save's format
    # (what torch.load expects), and as a bare pickle.
    for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin",
                 "pytorch_model.bin", "scaler.pt"):  # fmt: skip
        torch.save({"state": _Exploit(marker)}, checkpoint / name)
    (checkpoint / "training_state_rank0.pickle").write_bytes(pickle.dumps(_Exploit(marker)))
    torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)  # how Accelerate reads custom states
    assert marker.exists()  # the payload works
    marker.unlink()
    load_checkpoint(accelerator, checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
    restore_rng_states(accelerator, checkpoint)
    assert not marker.exists()


def test_states_that_json_cannot_hold_are_refused_by_name(tmp_path):
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    with pytest.raises(TypeError, match=r"Cannot store object at 'training_state_rank0.loop.callback'"):
        save(accelerator, tmp_path, 1, model, optimizer, scheduler, loop_state={"callback": object()})
    assert not list(tmp_path.iterdir())  # the partial folder is gone


# ---------------------------------------------------------------------------------------------------------------
# Fault 4: a failed write says why and harms nothing


def test_full_disk_raises_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    earlier = save(accelerator, tmp_path, 1, model, optimizer, scheduler)
    before = {path.name: path.read_bytes() for path in earlier.iterdir()}

    def disk_full(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(checkpoints, "save_file", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-2 \(RuntimeError: basic_ios::clear") as error:
        save(accelerator, tmp_path, 2, model, optimizer, scheduler, save_total_limit=1)
    assert str(tmp_path) in str(error.value) and " free" in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-1"]
    assert {path.name: path.read_bytes() for path in earlier.iterdir()} == before


def test_files_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    monkeypatch.setattr(
        os, "replace", lambda *paths: events.append(("replace", str(paths[1]))) or real_replace(*paths)
    )
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    checkpoint = save(accelerator, tmp_path, 1, model, optimizer, scheduler)
    rename = events.index(("replace", str(checkpoint)))
    flushed = {Path(path).name for kind, path in events[:rename] if kind == "fsync"}
    assert {path.name for path in checkpoint.iterdir()} <= flushed


# ---------------------------------------------------------------------------------------------------------------
# Fault 5: today's output-folder guarantees


def test_output_dir_guarantees(tmp_path, caplog):
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    with caplog.at_level(logging.INFO, logger="pretraining.checkpoints"):
        assert resolve_checkpoint("latest", tmp_path) is None
    assert "no checkpoint in" in caplog.text
    write_metrics(tmp_path, range(1, 3))
    prepare_output_dir(accelerator, tmp_path, None)  # a fresh run sets the old records aside
    assert not (tmp_path / "metrics.jsonl").exists() and len(list(tmp_path.glob("abandoned-*/metrics.jsonl"))) == 1

    save(accelerator, tmp_path, 2, model, optimizer, scheduler)
    (tmp_path / ".tmp-checkpoint-3").mkdir()  # an interrupted save
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-2\)"):
        prepare_output_dir(accelerator, tmp_path, None)
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        resolve_checkpoint(str(tmp_path / ".tmp-checkpoint-3"), tmp_path)

    info_file = tmp_path / "checkpoint-2" / "checkpoint.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "num_processes": 2}))
    with pytest.raises(ValueError, match="written by 2 processes but 1 are running"):
        prepare_output_dir(accelerator, tmp_path, tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="written by 2 processes but 1 are running"):
        load_checkpoint(accelerator, tmp_path / "checkpoint-2", model=model, optimizer=optimizer, scheduler=scheduler)
    assert (tmp_path / ".tmp-checkpoint-3").exists()  # refused before anything changed
    info_file.write_text(json.dumps(info))
    prepare_output_dir(accelerator, tmp_path, resolve_checkpoint("latest", tmp_path))
    assert not list(tmp_path.glob(".tmp-*"))


def test_unsupported_setups_and_arguments_are_refused(tmp_path, monkeypatch):
    accelerator, model, optimizer, scheduler = prepared(tiny_bert())
    with pytest.raises(ValueError, match="save_total_limit must be None"):
        save(accelerator, tmp_path, 1, model, optimizer, scheduler, save_total_limit=0)
    not_ours = tmp_path / "checkpoint-5"
    not_ours.mkdir()
    with pytest.raises(ValueError, match="is not a checkpoint folder: it has no checkpoint.json"):
        resolve_checkpoint(str(not_ours), tmp_path)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(ValueError, match="not FSDP"):
        save(accelerator, tmp_path, 1, model, optimizer, scheduler)


# ---------------------------------------------------------------------------------------------------------------
# Two ranks


TWO_RANK_WORKER = """
import sys, torch
sys.path.insert(0, {examples!r})
from accelerate import Accelerator
from transformers import BertConfig, BertForMaskedLM
import pretraining.checkpoints as checkpoints

output_dir = {output_dir!r}
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
assert accelerator.num_processes == 2, accelerator.distributed_type
torch.manual_seed(0)
config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
model = BertForMaskedLM(config)
optimizer = torch.optim.AdamW(model.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
model, optimizer = accelerator.prepare(model, optimizer)
checkpoints.prepare_output_dir(accelerator, output_dir, None)
torch.manual_seed(10 + rank)
for step in (1, 2):
    checkpoints.save_checkpoint(
        accelerator, output_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
        loop_state={{"step": step}}, dataloader_state={{"rank": rank}}, save_total_limit=1,
    )
expected = torch.rand(2).tolist()
# Only rank 1 cannot write: both ranks raise instead of waiting for each other forever.
if rank == 1:
    checkpoints.save_file = lambda *args, **kwargs: (_ for _ in ()).throw(OSError(28, "No space left on device"))
try:
    checkpoints.save_checkpoint(
        accelerator, output_dir, 3, model=model, optimizer=optimizer, scheduler=scheduler,
        loop_state={{}}, dataloader_state={{}},
    )
    raise AssertionError("the failed save did not raise")
except checkpoints.CheckpointWriteError as error:
    print(f"rank {{rank}} raised: {{error}}", flush=True)
checkpoint = checkpoints.resolve_checkpoint("latest", output_dir)
checkpoints.prepare_output_dir(accelerator, output_dir, checkpoint)
loop_state, dataloader_state = checkpoints.load_checkpoint(
    accelerator, checkpoint, model=model, optimizer=optimizer, scheduler=scheduler
)
checkpoints.restore_rng_states(accelerator, checkpoint)
assert loop_state == {{"step": 2}} and dataloader_state == {{"rank": rank}}, (loop_state, dataloader_state)
assert torch.rand(2).tolist() == expected  # this rank's own random stream
accelerator.wait_for_everyone()
del model, optimizer
accelerator.end_training()
print(f"rank {{rank}} ok", flush=True)
"""


def test_two_ranks_write_their_own_state_and_fail_together(tmp_path):
    output_dir = tmp_path / "out"
    worker = tmp_path / "worker.py"
    worker.write_text(TWO_RANK_WORKER.format(examples=str(EXAMPLES_DIR), output_dir=str(output_dir)))
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {
            **os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
        }  # fmt: skip
        log = (tmp_path / f"rank{rank}.log").open("w")
        processes.append(
            subprocess.Popen([sys.executable, str(worker)], env=env, stdout=log, stderr=log, cwd=REPO_ROOT)
        )
    try:
        for process in processes:
            process.wait(timeout=120)
    finally:
        for process in processes:
            process.kill()
    logs = [(tmp_path / f"rank{rank}.log").read_text() for rank in range(2)]
    for rank, (process, log) in enumerate(zip(processes, logs, strict=True)):
        assert process.returncode == 0, f"rank {rank}:\n{log[-4000:]}"
    assert "No space left on device" in logs[1] and "another rank failed" in logs[0]
    names = {path.name for path in (output_dir / "checkpoint-2").iterdir()}
    assert {"training_state_rank0.json", "training_state_rank1.json", "rng_state_rank1.safetensors"} <= names
    assert [path.name for path in list_checkpoints(output_dir)] == ["checkpoint-2"]
    assert not list(output_dir.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed: the engine keeps its own format, read without running code


DEEPSPEED_WORKER = """
import sys, torch
from pathlib import Path
sys.path.insert(0, {examples!r})
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from transformers import BertConfig, BertForMaskedLM
import pretraining.checkpoints as checkpoints

output_dir, marker = Path({output_dir!r}), Path({marker!r})
zero = {{"stage": {stage}, "stage3_gather_16bit_weights_on_model_save": True}}
config = {{"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "zero_optimization": zero}}
accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
torch.manual_seed(0)
model = BertForMaskedLM(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
model, optimizer = accelerator.prepare(model, optimizer)

def train(steps):
    losses = []
    for step in steps:
        data = torch.Generator().manual_seed(step)
        input_ids = torch.randint(0, 20, (2, 6), generator=data)
        loss = model(input_ids=input_ids, labels=input_ids).loss  # dropout draws from the torch RNG
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses

train(range(2))
checkpoint = checkpoints.save_checkpoint(
    accelerator, output_dir, 2, model=model, optimizer=optimizer, scheduler=scheduler,
    loop_state={{"step": 2}}, dataloader_state={{}},
)
expected = train(range(2, 4))
checkpoints.load_checkpoint(accelerator, checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
checkpoints.restore_rng_states(accelerator, checkpoint)
assert train(range(2, 4)) == expected
assert not [path for path in checkpoint.iterdir() if path.suffix in (".pkl", ".bin", ".pt")]
BertForMaskedLM.from_pretrained(checkpoint)

class Exploit:
    def __reduce__(self):
        return (Path.touch, (marker,))

(optimizer_file,) = (checkpoint / "deepspeed" / "engine").glob("*optim_states.pt")
torch.save({{"optimizer_state_dict": Exploit()}}, optimizer_file)
try:
    checkpoints.load_checkpoint(accelerator, checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
    raise AssertionError("the planted pickle was loaded")
except ValueError as error:
    assert "DEEPSPEED_SAFE_GLOBALS" in str(error), error
assert not marker.exists()
print("deepspeed ok", flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True).returncode != 0,
    reason="DeepSpeed is not installed (pip install -e '.[deepspeed]').",
)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_engine_resumes_exactly_and_its_files_run_no_code(tmp_path, stage):
    """One CPU process (DeepSpeed's CPU accelerator): the DeepSpeed branch, not distribution."""
    worker = tmp_path / "worker.py"
    marker = tmp_path / "code_ran"
    worker.write_text(
        DEEPSPEED_WORKER.format(
            examples=str(EXAMPLES_DIR), output_dir=str(tmp_path / "out"), marker=str(marker), stage=stage
        )
    )
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "ACCELERATE_USE_DEEPSPEED": "true",
    }  # fmt: skip
    result = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "deepspeed ok" in result.stdout
    assert not marker.exists()
