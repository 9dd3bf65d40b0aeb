"""2 ranks over gloo with 4 images each must train the tokenizer exactly like 1 rank with all 8 images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import free_port

WORKER = Path(__file__).with_name("vqkd_distributed_worker.py")


def _launch(world_size: int, tmp_path: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()
    outputs = [tmp_path / f"world{world_size}_rank{rank}.pt" for rank in range(world_size)]
    logs = [tmp_path / f"world{world_size}_rank{rank}.log" for rank in range(world_size)]
    # Each rank logs to a file: waiting on rank 0 while rank 1 fills an unread pipe would deadlock both.
    processes = []
    for rank, (output, log) in enumerate(zip(outputs, logs)):
        with log.open("w") as stream:
            command = [sys.executable, str(WORKER), str(world_size), str(rank), str(port), str(output)]
            processes.append(subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT))
    try:
        for process in processes:
            process.wait(timeout=240)
    finally:
        for process in processes:
            process.kill()
    for rank, (process, log) in enumerate(zip(processes, logs)):
        assert process.returncode == 0, f"rank {rank} of {world_size} failed:\n{log.read_text()[-4000:]}"
    return [torch.load(output) for output in outputs]


def test_two_ranks_match_one_rank_with_kmeans_init_and_dead_code_restart(tmp_path):
    (single,) = _launch(1, tmp_path)
    rank0, rank1 = _launch(2, tmp_path)
    # The dead-code restart really ran (after k-means some codes hold fewer than 1 vector per step).
    assert single["dead_codes"] == rank0["dead_codes"] == rank1["dead_codes"]
    assert sum(single["dead_codes"]) > 0
    for name in ("quantizer.codebook", "quantizer.cluster_size", "quantizer.initted"):
        assert torch.equal(rank0["state_dict"][name], rank1["state_dict"][name]), name  # bit-identical
    for name, value in single["state_dict"].items():
        if name.startswith(("quantizer.", "encoder.")):
            torch.testing.assert_close(rank0["state_dict"][name], value, atol=1e-5, rtol=0, msg=name)
    assert bool(single["state_dict"]["quantizer.initted"])
