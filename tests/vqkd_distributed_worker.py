"""Worker for tests/test_quantizer_distributed.py: 3 VQ-KD training steps on a share of 8 fixed images.

Usage: python vqkd_distributed_worker.py WORLD_SIZE RANK PORT OUTPUT_FILE (WORLD_SIZE 1 runs without
torch.distributed). Rank r trains on images [r * 8 / W, (r + 1) * 8 / W) with gradients averaged by DDP.
"""

from __future__ import annotations

import faulthandler
import gc
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from modeling_beitv2 import VQKDConfig, VQKDModel
from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config

TINY_VIT = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)


def main(world_size: int, rank: int, port: int, output_file: str) -> None:
    # A rank stuck in a collective prints every thread's stack and exits instead of hanging the test.
    faulthandler.dump_traceback_later(180, exit=True)
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            world_size=world_size,
            rank=rank,
            timeout=timedelta(seconds=150),
        )
    config = VQKDConfig(
        encoder_config=vqkd_encoder_config("tiny", image_size=32, patch_size=8, num_hidden_layers=2, **TINY_VIT),
        decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=4, code_dim=8, **TINY_VIT),
        codebook_size=64,
        code_dim=8,
        teacher_dim=16,
        kmeans_init=True,
        dead_code_threshold=1.0,
    )
    torch.manual_seed(0)
    model = VQKDModel(config).train()
    data = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 32, 32, generator=data)  # [0, 1]: the tokenizer maps them itself
    targets = torch.randn(8, 16, 16, generator=data)
    share = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    # broadcast_buffers=False: DDP must not hide a codebook that drifted apart between ranks.
    trained = DistributedDataParallel(model, broadcast_buffers=False) if world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    dead_codes = []
    for _ in range(3):
        output = trained(images[share], teacher_features=targets[share])
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dead_codes.append(int(output.num_dead_codes))
    torch.save({"state_dict": model.state_dict(), "dead_codes": dead_codes}, output_file)
    if world_size > 1:
        # DDP goes first: if its reducer dropped the last reference to the gloo group, the group's destructor would
        # join gloo's worker threads while holding the GIL, and a worker freeing its last work item needs the GIL
        # (a deadlock seen about once in ten runs with torch 2.13).
        del trained
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
