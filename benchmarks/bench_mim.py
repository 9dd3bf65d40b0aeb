"""Full MIM training steps (forward, backward, AdamW) of ours vs transformers' BeitForMaskedImageModeling.

Same config and weights, ViT-Ti/16 at 224 px, batch 8, 40% masked (the same count in every image, so ours runs
its static-shape path, `num_masked_patches=`, as the training script does); all models use the same
`--attn_implementation`. The variants are interleaved step by step in one process so that machine noise hits them
alike. Peak memory is measured per variant in a child process (peak RSS growth over the training steps). Prints
one JSON line per measurement and one with the ratios.

    python benchmarks/bench_mim.py [--steps 6] [--threads 2] [--attn_implementation sdpa]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from transformers import BeitConfig, BeitForMaskedImageModeling

from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling

VARIANTS = ("transformers_beit_v1", "ours_aggregation_off", "ours_aggregation_on")


# FlexAttention has no backward pass on CPU, so it cannot train here.
CPU_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def build(variant: str, image_size: int, attn_implementation: str = "sdpa") -> torch.nn.Module:
    config = BeitV2Config.from_preset("tiny", image_size=image_size, use_patch_aggregation=variant.endswith("on"))
    torch.manual_seed(0)
    ours = BeitV2ForMaskedImageModeling._from_config(config, attn_implementation=attn_implementation)
    if variant != "transformers_beit_v1":
        return ours
    stock_fields = set(BeitConfig().to_dict()) - {"model_type", "transformers_version", "architectures"}
    stock_config = BeitConfig(**{k: v for k, v in config.to_dict().items() if k in stock_fields})
    stock = BeitForMaskedImageModeling._from_config(stock_config, attn_implementation=attn_implementation)
    stock.load_state_dict(ours.state_dict(), strict=False)  # same weights; ours may hold an extra head
    return stock


def make_batch(batch_size: int, image_size: int, vocab_size: int = 8192):
    generator = torch.Generator().manual_seed(0)
    num_patches = (image_size // 16) ** 2
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    bool_masked_pos = torch.zeros(batch_size, num_patches, dtype=torch.bool)
    for row in bool_masked_pos:
        row[torch.randperm(num_patches, generator=generator)[: num_patches * 2 // 5]] = True
    labels = torch.randint(0, vocab_size, (batch_size, num_patches), generator=generator)
    return pixel_values, bool_masked_pos, labels


def train_step(variant: str, model, optimizer, batch) -> float:
    pixel_values, bool_masked_pos, labels = batch
    if variant == "transformers_beit_v1":
        loss = model(pixel_values, bool_masked_pos=bool_masked_pos, labels=labels[bool_masked_pos]).loss
    else:
        num_masked = bool_masked_pos.shape[1] * 2 // 5  # make_batch masks this many patches in every image
        loss = model(pixel_values, bool_masked_pos, labels=labels, num_masked_patches=num_masked).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def peak_rss_mib(reset: bool = False) -> float:
    """Peak resident memory of this process. On Linux the peak is reset first when asked (a forked child
    otherwise inherits its parent's peak); elsewhere it falls back to `ru_maxrss`."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_child(variant: str, args) -> None:
    """Runs in a child process: prints the peak RSS growth (MiB) over a few training steps of one variant."""
    torch.set_num_threads(args.threads)
    model = build(variant, args.image_size, args.attn_implementation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(args.batch_size, args.image_size)
    before = peak_rss_mib(reset=True)
    for _ in range(3):
        train_step(variant, model, optimizer, batch)
    print(json.dumps({"peak_rss_growth_mib": peak_rss_mib() - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attn_implementation", choices=CPU_ATTENTION_IMPLEMENTATIONS, default="sdpa")
    parser.add_argument("--memory_child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child, args)
        return

    torch.set_num_threads(args.threads)
    models = {variant: build(variant, args.image_size, args.attn_implementation) for variant in VARIANTS}
    optimizers = {v: torch.optim.AdamW(m.parameters(), lr=1e-4) for v, m in models.items()}
    batch = make_batch(args.batch_size, args.image_size)
    elapsed = dict.fromkeys(VARIANTS, 0.0)
    for step in range(args.steps + 2):
        for variant in VARIANTS:  # interleaved: noise hits every variant alike
            start = time.perf_counter()
            train_step(variant, models[variant], optimizers[variant], batch)
            if step >= 2:
                elapsed[variant] += time.perf_counter() - start

    results = {}
    for variant in VARIANTS:
        child = subprocess.run(
            [sys.executable, __file__, "--memory_child", variant, "--batch_size", str(args.batch_size),
             "--image_size", str(args.image_size), "--threads", str(args.threads),
             "--attn_implementation", args.attn_implementation],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        memory = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]
        results[variant] = {
            "benchmark": "mim_train_step",
            "variant": variant,
            "model": "ViT-Ti/16",
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "attn_implementation": args.attn_implementation,
            "images_per_s": args.batch_size * args.steps / elapsed[variant],
            "step_s": elapsed[variant] / args.steps,
            "peak_rss_growth_mib": memory,
        }
        print(json.dumps(results[variant]))
    reference = results["transformers_beit_v1"]
    print(
        json.dumps(
            {
                "benchmark": "mim_train_step_ratios",
                "throughput_ours_vs_transformers": results["ours_aggregation_off"]["images_per_s"]
                / reference["images_per_s"],
                "memory_ours_vs_transformers": results["ours_aggregation_off"]["peak_rss_growth_mib"]
                / reference["peak_rss_growth_mib"],
                "aggregation_cost_step_time_on_vs_off": results["ours_aggregation_on"]["step_s"]
                / results["ours_aggregation_off"]["step_s"],
            }
        )
    )


if __name__ == "__main__":
    main()
