"""The training scripts as users launch them: `accelerate launch` with 2 CPU processes, SIGTERM, DeepSpeed ZeRO-2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    free_port,
    make_image_folder,
    make_teacher,
    make_vqkd_tokenizer,
    mim_args,
    read_metrics,
    reset_accelerator_state,
    vqkd_args,
    write_parquet_shards,
)
from safetensors.torch import load_file
from test_pixel_decoder import tiny_tokenizer
from test_run_pixel_decoder import decoder_args

from demo_pipeline.data import write_demo_dataset
from pretraining.loop import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")

# Runs a script with an audit of the examples each rank trains on (written to example_ids_rank{N}.txt in
# --output_dir): the streams yield their example ids (`ImageStream(with_ids=True)`, a test-only option) and the
# loop's batch fetch writes and removes them before the batch reaches the model.
AUDITED_LAUNCH = """
import os, runpy, sys
sys.path.insert(0, {examples!r})
import pretraining.data as data
import pretraining.loop as loop

class AuditedStream(data.ImageStream):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, with_ids=True, **kwargs)

data.ImageStream = AuditedStream
next_batch = loop.MetricsWindow.next_batch
output_dir = sys.argv[sys.argv.index("--output_dir") + 1]

def audited_next_batch(self, batches):
    batch = next_batch(self, batches)
    rank = self.accelerator.process_index
    with open(os.path.join(output_dir, f"example_ids_rank{{rank}}.txt"), "a") as ids:
        ids.writelines(identifier + "\\n" for identifier in batch.pop("example_id"))
    return batch

loop.MetricsWindow.next_batch = audited_next_batch
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def audited(script: str, folder: Path) -> str:
    """A launcher file that runs examples/`script` with the example-id audit."""
    launcher = folder / f"audited_{script}"
    launcher.write_text(AUDITED_LAUNCH.format(examples=str(EXAMPLES), script=str(EXAMPLES / script)))
    return str(launcher)


def script_env() -> dict[str, str]:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch_two_cpu_processes(script: str, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    command = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        script, *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    # Each rank dropped its DDP wrapper before the process group (see pretraining.loop.end_training).
    assert "still referenced while the process group is destroyed" not in result.stderr
    return result


def assert_two_ranks_with_disjoint_data(result: subprocess.CompletedProcess, output_dir: Path, per_rank: int):
    output = result.stdout + result.stderr
    assert "[rank 0] world size 2, distributed type MULTI_CPU" in output
    assert "[rank 1] world size 2, distributed type MULTI_CPU" in output
    ids = [(output_dir / f"example_ids_rank{rank}.txt").read_text().split() for rank in range(2)]
    assert len(ids[0]) == len(ids[1]) == per_rank
    assert set(ids[0]).isdisjoint(ids[1])


@pytest.mark.slow
def test_mim_on_two_cpu_processes_trains_on_disjoint_shards(tmp_path):
    files = write_parquet_shards(tmp_path / "parquet", 16, 4)  # 2 shards per rank
    tokenizer = make_vqkd_tokenizer(tmp_path / "vqkd")
    output_dir = tmp_path / "out"
    args = mim_args(files, tokenizer, output_dir, "--max_steps", "2", "--save_steps", "0")
    args[args.index("--per_device_train_batch_size") + 1] = "3"
    result = launch_two_cpu_processes(audited("run_mim.py", tmp_path), args)
    # 2 steps x 3 images per rank, all from different shards: no image is seen by both ranks.
    assert_two_ranks_with_disjoint_data(result, output_dir, per_rank=6)
    records = read_metrics(output_dir)
    assert [record["step"] for record in records] == [1, 2]
    assert all(record["images_per_second"] > 0 and "loss_aggregation" in record for record in records)
    assert sorted(p.name for p in (output_dir / "checkpoint-2").glob("training_state_rank*.json")) == [
        "training_state_rank0.json",
        "training_state_rank1.json",
    ]


@pytest.mark.slow
def test_vqkd_on_two_cpu_processes_trains_on_disjoint_examples(tmp_path):
    images = make_image_folder(tmp_path / "images", num_images=10, corrupt=False)  # 1 shard: split by example
    teacher = make_teacher(tmp_path / "teacher")
    output_dir = tmp_path / "out"
    args = vqkd_args(images, teacher, output_dir, "--max_steps", "2", "--save_steps", "0")
    args[args.index("--per_device_train_batch_size") + 1] = "2"
    result = launch_two_cpu_processes(audited("run_vqkd.py", tmp_path), args)
    assert_two_ranks_with_disjoint_data(result, output_dir, per_rank=4)
    assert {"codebook_usage", "perplexity", "num_dead_codes"} <= set(read_metrics(output_dir)[-1])


@pytest.mark.slow
def test_pixel_decoder_on_two_cpu_processes_sums_its_baseline_and_evaluation_over_ranks(tmp_path):
    """The mean-patch baseline is fitted on every rank's share of the training images and summed, and the held-out
    scores are summed over ranks: with a baseline over all training images, two processes score the baseline exactly
    as one does (the decoder itself differs: each rank trained on other images)."""
    folders = write_demo_dataset(tmp_path / "data", {"train": 8, "validation": 3}, image_size=32)
    tiny_tokenizer().save_pretrained(tmp_path / "vqkd")
    inputs = folders, tmp_path / "vqkd"
    scores = {}
    for processes in (1, 2):
        output_dir = tmp_path / f"processes_{processes}"
        evaluation = ("--do_eval", "--validation_dir", str(folders["validation"]), "--baseline_images", "1000")
        args = decoder_args(inputs, output_dir, "--max_steps", "1", "--save_steps", "0", *evaluation)
        script = str(EXAMPLES / "run_pixel_decoder.py")
        if processes == 1:
            result = subprocess.run(
                [sys.executable, script, *args], env=script_env(), capture_output=True, text=True, timeout=240
            )
            assert result.returncode == 0, result.stderr[-6000:]
        else:
            launch_two_cpu_processes(script, args)
        scores[processes] = [record for record in read_metrics(output_dir) if "eval_baseline_psnr" in record][-1]
    assert scores[2]["eval_baseline_psnr"] == pytest.approx(scores[1]["eval_baseline_psnr"], rel=1e-5)
    assert scores[2]["eval_psnr"] > 0


def test_sigterm_saves_a_checkpoint_and_exits_as_preempted(tmp_path):
    images = make_image_folder(tmp_path / "images", num_images=6, corrupt=False)
    teacher = make_teacher(tmp_path / "teacher")
    output_dir = tmp_path / "out"
    args = vqkd_args(images, teacher, output_dir, "--max_steps", "100000", "--save_steps", "0")
    # Output goes to a file, not a pipe: nobody reads a pipe while we poll, and a full one would block the run.
    log_file = tmp_path / "run.log"
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "run_vqkd.py"), *args], env=script_env(), stdout=log, stderr=log
        )
        try:
            metrics = output_dir / "metrics.jsonl"
            deadline = time.monotonic() + 120
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
                assert process.poll() is None and time.monotonic() < deadline, log_file.read_text()[-4000:]
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            process.kill()
    output = log_file.read_text()
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-4000:]  # not 0: the run did not finish
    assert "Stopped by SIGTERM" in output
    checkpoints = list(output_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and 2 <= int(checkpoints[0].name.split("-")[1]) < 100000
    assert not list(output_dir.glob(".tmp-checkpoint-*"))
    assert not (output_dir / "model.safetensors").exists()  # a stopped run leaves its checkpoint, no final export


@pytest.mark.slow
@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True).returncode != 0,
    reason="DeepSpeed is not installed (pip install -e '.[deepspeed]'); its first CPU run also compiles an op.",
)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_plain_training(tmp_path, stage):
    """ZeRO-2/3 through the shipped configs, one CPU process (DeepSpeed's CPU accelerator; on CPU, Accelerate reports
    a single process even with several, so this checks the DeepSpeed code path, not distributed training)."""
    sys.path.insert(0, str(EXAMPLES))
    import run_mim

    files = write_parquet_shards(tmp_path / "parquet", 8, 1)
    tokenizer = make_vqkd_tokenizer(tmp_path / "vqkd")
    common = ("--max_steps", "3", "--save_steps", "0")
    plain = tmp_path / "plain"
    reset_accelerator_state()
    run_mim.main(mim_args(files, tokenizer, plain, *common))
    reset_accelerator_state()
    zero = tmp_path / f"zero{stage}"
    command = [
        ACCELERATE, "launch", "--config_file", str(EXAMPLES / "configs" / f"deepspeed_zero{stage}.yaml"),
        "--num_processes", "1", "--main_process_port", str(free_port()),
        str(EXAMPLES / "run_mim.py"), *mim_args(files, tokenizer, zero, *common),
    ]  # fmt: skip
    env = {key: value for key, value in script_env().items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "distributed type DEEPSPEED" in result.stdout + result.stderr
    plain_losses = [record["loss"] for record in read_metrics(plain)]
    zero_losses = [record["loss"] for record in read_metrics(zero)]
    assert zero_losses == pytest.approx(plain_losses, rel=1e-4)
    assert (zero / "checkpoint-3" / "training_state_rank0.json").is_file()
    # The final export gathers the (ZeRO-3: partitioned) weights; the frozen tokenizer stays whole and out of it.
    plain_weights, zero_weights = load_file(plain / "model.safetensors"), load_file(zero / "model.safetensors")
    assert zero_weights.keys() == plain_weights.keys()
    for key, value in plain_weights.items():
        torch.testing.assert_close(zero_weights[key], value, rtol=1e-4, atol=1e-5)
