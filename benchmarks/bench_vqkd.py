"""Benchmark of the VQ-KD tokenizer; prints one JSON line per measurement.

(a) The quantizer alone, training mode, 12,544 vectors (batch 64 x 196 patches) against an 8192 x 32 codebook:
    ours (chunked matmul + bincount/index_add) against a reference-style quantizer written below (full distance
    matrix, one-hot encodings, one-hot matmul for the sums). Timings are interleaved in one process; peak memory
    is `torch.cuda.max_memory_allocated` on a GPU, or on CPU the growth of the peak resident set (VmHWM, reset
    first) of a fresh subprocess running one step (Linux).
(b) A full tokenizer training step (ViT-Ti/16 encoder, 1-layer decoder, 224 px, batch 8; random teacher targets).
(c) Tokenization (`get_codebook_indices`) throughput, same model and batch.

Usage: python benchmarks/bench_vqkd.py [--device cpu|cuda] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from modeling_beitv2 import NormEMAVectorQuantizer, VQKDConfig, VQKDModel

NUM_CODES, CODE_DIM, NUM_VECTORS = 8192, 32, 64 * 196


class OneHotReferenceQuantizer(torch.nn.Module):
    """The reference algorithm as the official code computes it: full distances, one-hot histogram and sums."""

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("codebook", F.normalize(torch.randn(NUM_CODES, CODE_DIM), dim=-1))
        self.register_buffer("cluster_size", torch.zeros(NUM_CODES))

    def forward(self, z: torch.Tensor):
        z = F.normalize(z, dim=-1)
        distances = z.pow(2).sum(1, keepdim=True) + self.codebook.pow(2).sum(1) - 2 * z @ self.codebook.T
        indices = distances.argmin(1)
        codes = self.codebook[indices]
        encodings = F.one_hot(indices, NUM_CODES).type(z.dtype)
        with torch.no_grad():
            bins = encodings.sum(0)
            self.cluster_size.mul_(self.decay).add_(bins, alpha=1 - self.decay)
            unused = bins == 0
            embed_sum = z.detach().T @ encodings
            means = F.normalize((embed_sum / bins.masked_fill(unused, 1).unsqueeze(0)).T, dim=-1)
            means = torch.where(unused[:, None], self.codebook, means)
            self.codebook.mul_(self.decay).add_(means, alpha=1 - self.decay)
            self.codebook.copy_(F.normalize(self.codebook, dim=-1))
        loss = F.mse_loss(codes.detach(), z)
        return z + (codes - z).detach(), loss, indices


def make_quantizer(name: str, device: str) -> torch.nn.Module:
    if name == "reference_one_hot":
        return OneHotReferenceQuantizer().to(device).train()
    return NormEMAVectorQuantizer(NUM_CODES, CODE_DIM).to(device).train()


def quantizer_step(quantizer: torch.nn.Module, z: torch.Tensor) -> None:
    output = quantizer(z)
    loss = output[1] if isinstance(output, tuple) else output.loss
    loss.backward()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(name: str, device: str) -> float:
    if device == "cuda":
        quantizer = make_quantizer(name, device)
        z = torch.randn(NUM_VECTORS, CODE_DIM, device=device, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        quantizer_step(quantizer, z)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", name], capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def memory_child(name: str) -> None:
    torch.set_num_threads(1)
    quantizer = make_quantizer(name, "cpu")
    z = torch.randn(NUM_VECTORS, CODE_DIM, requires_grad=True)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak resident set (VmHWM) to the current one
    baseline = _status_kib("VmRSS")
    quantizer_step(quantizer, z)
    print((_status_kib("VmHWM") - baseline) / 1024)


def bench_quantizer(device: str, repeats: int) -> None:
    names = ("reference_one_hot", "ours")
    quantizers = {name: make_quantizer(name, device) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats + 1):
        for name in names:  # interleaved so that machine load hits both alike
            z = torch.randn(NUM_VECTORS, CODE_DIM, device=device, requires_grad=True)
            sync(device)
            start = time.perf_counter()
            quantizer_step(quantizers[name], z)
            sync(device)
            if repeat:  # the first round is warm-up
                times[name].append(time.perf_counter() - start)
    memory = {name: peak_memory_mib(name, device) for name in names}
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    for name in names:
        print(
            json.dumps(
                {
                    "bench": "quantizer_train_step",
                    "impl": name,
                    "device": device,
                    "median_s": round(median[name], 4),
                    "peak_extra_mib": round(memory[name], 1),
                }
            )
        )
    print(
        json.dumps(
            {
                "bench": "quantizer_train_step",
                "speedup": round(median["reference_one_hot"] / median["ours"], 2),
                "memory_ratio": round(memory["reference_one_hot"] / max(memory["ours"], 1e-3), 2),
            }
        )
    )


def tiny_vit_tokenizer(device: str) -> VQKDModel:
    config = VQKDConfig.from_preset("tiny-decoder1", image_size=224, teacher_dim=512, kmeans_init=False)
    return VQKDModel(config).to(device)


def bench_model(device: str, repeats: int, batch_size: int = 8) -> None:
    torch.manual_seed(0)
    model = tiny_vit_tokenizer(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.99), weight_decay=1e-4)
    pixels = torch.rand(batch_size, 3, 224, 224, device=device)  # [0, 1]: the tokenizer maps them itself
    targets = torch.randn(batch_size, 196, 512, device=device)
    step_times, token_times = [], []
    for repeat in range(repeats + 1):
        model.train()
        sync(device)
        start = time.perf_counter()
        output = model(pixels, teacher_features=targets)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        train_time = time.perf_counter() - start
        model.eval()
        start = time.perf_counter()
        model.get_codebook_indices(pixels)
        sync(device)
        token_time = time.perf_counter() - start
        if repeat:
            step_times.append(train_time)
            token_times.append(token_time)
    for bench, values in (("vqkd_train_step", step_times), ("vqkd_tokenization", token_times)):
        median = sorted(values)[len(values) // 2]
        print(
            json.dumps(
                {
                    "bench": bench,
                    "model": "ViT-Ti/16 enc + 1-layer dec, 224 px",
                    "device": device,
                    "batch": batch_size,
                    "images_per_s": round(batch_size / median, 2),
                }
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    torch.set_num_threads(args.threads)
    bench_quantizer(args.device, args.repeats)
    bench_model(args.device, args.repeats)


if __name__ == "__main__":
    main()
