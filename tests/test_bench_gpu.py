"""benchmarks/bench_gpu.py and its gpu_*.py modules: the quick CPU run of every section, its time limits, and the
pieces it relies on."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402
import gpu_cases_model  # noqa: E402
import gpu_cases_official  # noqa: E402
import gpu_cases_scripts  # noqa: E402
import gpu_common  # noqa: E402
import gpu_results  # noqa: E402
import gpu_timing  # noqa: E402

# A stand-in for a checkout of microsoft/unilm's beit2/ (which needs timm): the same module names, class names,
# constructor keywords and outputs, tiny modules inside. Like the real modeling_vqkd.py it imports the training-only
# `utils` and `vqkd_teacher`, which bench_gpu.py must replace while importing it.
FAKE_MODELING_PRETRAIN = """
import torch
from torch import nn


class VisionTransformerForMaskedImageModelingCLS(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, vocab_size=8192, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, norm_layer=None, init_values=None, attn_head_dim=None, use_abs_pos_emb=True,
                 use_rel_pos_bias=False, use_shared_rel_pos_bias=False, init_std=0.02, early_layers=6,
                 head_layers=2, shared_lm_head=True):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(embed_dim, num_heads, int(embed_dim * mlp_ratio), batch_first=True)
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self.early_layers = early_layers

    def forward(self, x, bool_masked_pos=None):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index + 1 == self.early_layers:
                early = x
        return [self.lm_head(self.norm(x)[bool_masked_pos]), self.lm_head(self.norm(early)[bool_masked_pos])]
"""
FAKE_MODELING_VQKD = """
import torch
from torch import nn

import utils  # noqa: F401
from vqkd_teacher import clip, get_dino_vit_base  # noqa: F401


def get_model_default_params():
    return dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12, num_heads=12,
                mlp_ratio=4.0)


class VQKD(nn.Module):
    def __init__(self, encoder_config, decoder_config, n_embed=8192, embed_dim=32, decay=0.99, process_type="default",
                 quantize_kmeans_init=True, teacher_model_type="clip", decoder_out_dim=512, rec_loss_type="cosine",
                 **kwargs):
        super().__init__()
        if teacher_model_type == "clip":
            clip.load("ViT-B/16")
        assert decoder_config["in_chans"] == embed_dim and encoder_config["num_classes"] == 0
        size = encoder_config["patch_size"]
        self.encoder = nn.Conv2d(3, encoder_config["embed_dim"], size, size)
        self.task_layer = nn.Linear(encoder_config["embed_dim"], embed_dim)
        self.register_buffer("codebook", nn.functional.normalize(torch.randn(n_embed, embed_dim), dim=-1))

    def get_codebook_indices(self, x):
        x = x * 2 - 1
        features = self.task_layer(self.encoder(x).flatten(2).transpose(1, 2))
        with torch.autocast(x.device.type, enabled=False):
            return (nn.functional.normalize(features.float(), dim=-1) @ self.codebook.T).argmax(-1)
"""


def write_fake_beit2(folder: Path, pretrain_source: str = FAKE_MODELING_PRETRAIN) -> Path:
    folder.mkdir(parents=True)
    (folder / "modeling_pretrain.py").write_text(textwrap.dedent(pretrain_source))
    (folder / "modeling_vqkd.py").write_text(textwrap.dedent(FAKE_MODELING_VQKD))
    return folder


def positive_numbers(record: dict, keys: tuple[str, ...]) -> bool:
    return all(isinstance(record.get(key), (int, float)) and record[key] > 0 for key in keys)


@pytest.mark.slow
def test_quick_run_measures_every_section(tmp_path):
    output = tmp_path / "out" / "results_gpu.md"
    official = write_fake_beit2(tmp_path / "beit2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--quick", "--output", str(output),
               "--official_beit2_dir", str(official), "--work_dir", str(tmp_path / "work")]  # fmt: skip
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]

    results = json.loads(output.with_suffix(".json").read_text())
    sections = results["sections"]
    assert list(sections) == list(gpu_common.SECTIONS)
    for name, section in sections.items():
        assert section["status"] == "ok", (name, section)
        assert section["errors"] == [], (name, section["errors"])
        assert section["records"], name
    assert results["peak_tflops"] > 0
    assert results["machine"]["versions"]["torch"] == torch.__version__

    mim = sections["mim"]["records"]
    for record in mim:
        assert positive_numbers(record, ("images_per_s", "ms_per_step", "gflop_per_image", "mfu")), record
        assert math.isfinite(record["loss"])
    ours = {(r["attention"], r["aggregation"], r["compiled"], r["precision"]) for r in mim if r["model"] == "ours"}
    assert {("eager", True, False, "fp32"), ("sdpa", False, False, "bf16"), ("sdpa", True, False, "bf16")} <= ours
    assert any(r["model"].startswith("transformers") for r in mim)
    compiled = [r for r in mim if r["compiled"]]
    assert len(compiled) == 1 and compiled[0]["compile_s"] > 0 and compiled[0]["graphs"] >= 1
    # The patch-aggregation head adds work: FLOPs are counted per model, not copied between them.
    flops = {r["aggregation"]: r["gflop_per_image"] for r in mim if r["model"] == "ours"}
    assert flops[True] > flops[False]

    tokenizer = sections["tokenizer"]["records"]
    assert [r["precision"] for r in tokenizer][:4] == ["fp32", "fp32 + TF32 matmuls", "bf16 autocast", "fp16 autocast"]
    assert tokenizer[-1]["compiled"]
    for record in tokenizer:
        assert positive_numbers(record, ("images_per_s", "agreement_with_fp32", "gflop_per_image", "mfu")), record
    assert tokenizer[0]["agreement_with_fp32"] == 1.0

    official_records = sections["official"]["records"]
    assert {r["table"] for r in official_records} == {"mim", "tokenizer"}
    for record in official_records:
        assert positive_numbers(record, ("images_per_s", "gflop_per_image", "mfu")), record

    for record in sections["pipeline"]["records"]:
        assert positive_numbers(record, ("images_per_s", "workers_used", "images_timed")), record

    scripts = {r["script"]: r for r in sections["scripts"]["records"]}
    assert set(scripts) == {"run_mim.py", "run_vqkd.py"}
    for record in scripts.values():
        assert positive_numbers(record, ("images_per_s", "gflop_per_image", "mfu", "steady_windows")), record
        assert record["losses"] and all(math.isfinite(value) for value in record["losses"].values())
        assert record["returncode"] == 0

    markdown = output.read_text()
    for title, columns in gpu_results.TABLES.values():
        assert f"## {title}" in markdown
        assert "| " + " | ".join(column.header for column in columns) + " |" in markdown
    assert "| images/s | ms/step | GFLOP/image | MFU | peak GiB |" in markdown
    assert "official VisionTransformerForMaskedImageModelingCLS" in markdown


def make_bench(tmp_path: Path, timeouts: dict[str, float], **arguments) -> gpu_common.Bench:
    args = bench_gpu.parse_args(["--quick", *[f"--{key}={value}" for key, value in arguments.items()]])
    sizes = dataclasses.replace(gpu_common.QUICK, section_timeouts=timeouts)
    header = {"command": "test", "machine": bench_gpu.machine_description(torch.device("cpu")), "sizes":
              dataclasses.asdict(sizes), "peak_tflops": None}  # fmt: skip
    results = gpu_results.Results(tmp_path / "results.md", header)
    return gpu_common.Bench(args, sizes, torch.device("cpu"), results, tmp_path)


def test_a_slow_or_failing_section_is_recorded_and_the_next_ones_run(tmp_path):
    bench = make_bench(tmp_path, {"mim": 1.0, "tokenizer": 10.0, "official": 10.0, "pipeline": 10.0})
    record = {"table": "pipeline", "workers": 1, "images_per_s": 5.0}

    def slow(bench):
        bench.results.add("mim", {**record, "workers": 2})
        time.sleep(30)

    def failing(bench):
        raise ValueError("broken on purpose")

    def skipped(bench):
        raise gpu_common.SectionSkipped("nothing to compare with")

    def fine(bench):
        bench.results.add("pipeline", record)

    functions = {"mim": slow, "tokenizer": failing, "official": skipped, "pipeline": fine}
    started = time.monotonic()
    bench_gpu.run_sections(bench, list(functions), functions, budget_s=60)
    assert time.monotonic() - started < 20

    saved = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert saved["mim"]["status"] == "timeout" and "time limit of 1 s" in saved["mim"]["note"]
    assert saved["mim"]["records"] == [{**record, "workers": 2}]  # measured before the limit: kept
    assert saved["tokenizer"]["status"] == "error" and "broken on purpose" in saved["tokenizer"]["note"]
    assert saved["official"]["status"] == "skipped" and saved["official"]["note"] == "nothing to compare with"
    assert saved["pipeline"]["status"] == "ok" and saved["pipeline"]["records"] == [record]
    markdown = (tmp_path / "results.md").read_text()
    assert "| mim | timeout |" in markdown and "broken on purpose" in markdown


def test_sections_past_the_budget_are_skipped(tmp_path):
    bench = make_bench(tmp_path, {"mim": 10.0})
    calls = []
    bench_gpu.run_sections(bench, ["mim"], {"mim": calls.append}, budget_s=1)
    assert calls == []
    section = json.loads((tmp_path / "results.json").read_text())["sections"]["mim"]
    assert section["status"] == "skipped" and "--time_budget_s" in section["note"]


def test_full_run_refuses_a_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench_gpu.parse_args([])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "needs a CUDA GPU" in error and "--quick" in error


def test_unknown_section_or_timeout_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--quick", "--sections", "mim,tokeniser"])
    error = capsys.readouterr().err
    assert "tokeniser" in error and "mim, tokenizer, official, pipeline, scripts" in error
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--quick", "--section_timeouts", "mim=10,gpu=5"])
    assert "NAME=SECONDS" in capsys.readouterr().err


def test_attention_implementations_are_discovered(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import modeling_beitv2

    def registered_for_test(*args, **kwargs):
        raise NotImplementedError

    registered_for_test.__module__ = "modeling_beitv2.attention_for_test"
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "registered_for_test", registered_for_test)
    monkeypatch.setattr(
        modeling_beitv2, "ATTENTION_IMPLEMENTATIONS_FOR_TEST", ("sdpa", "listed_for_test"), raising=False
    )
    found = gpu_cases_model.attention_implementations(None)
    assert found[:2] == ("eager", "sdpa") and len(set(found)) == len(found)
    assert {"registered_for_test", "listed_for_test"} <= set(found)
    assert "flash_attention_2" not in found  # registered by transformers, not by our package
    assert gpu_cases_model.attention_implementations("sdpa, eager,sdpa") == ("sdpa", "eager")


def test_official_import_failure_is_a_clear_skip(tmp_path):
    folder = write_fake_beit2(tmp_path / "beit2", "import timm_is_not_installed_here\n")
    path_before, modules_before = list(sys.path), set(sys.modules)
    with pytest.raises(gpu_common.SectionSkipped, match="could not be imported.*timm_is_not_installed_here"):
        gpu_cases_official.import_official(folder)
    assert sys.path == path_before
    assert not {"utils", "vqkd_teacher"} & (set(sys.modules) - modules_before)
    with pytest.raises(gpu_common.SectionSkipped, match="not a checkout"):
        gpu_cases_official.import_official(tmp_path)


def test_cpu_sdpa_flops_are_counted():
    query = torch.randn(2, 3, 17, 8)
    bias = torch.randn(1, 3, 17, 17)
    sdpa = gpu_timing.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query, bias))
    eager = gpu_timing.count_flops(lambda: (query @ query.transpose(-1, -2) + bias).softmax(-1) @ query)
    assert sdpa == eager == 2 * (2 * 2 * 3 * 17 * 17 * 8)


def test_script_metrics_skip_the_warmup_window():
    records = [
        {"step": 10, "images_per_second": 5.0, "loss": 9.0},  # start-up and compilation
        {"step": 20, "images_per_second": 100.0, "data_wait_fraction": 0.5, "loss": 8.0},
        {"step": 30, "images_per_second": 200.0, "data_wait_fraction": 0.1, "loss": 7.0, "loss_mim": 3.5},
    ]
    summary = gpu_cases_scripts.summarize_metrics(records)
    assert summary["images_per_s"] == 150.0 and summary["data_wait_fraction"] == pytest.approx(0.3)
    assert summary["losses"] == {"loss": 7.0, "loss_mim": 3.5} and summary["steady_windows"] == 2
    assert summary["steps"] == 30
    assert "images_per_s" not in gpu_cases_scripts.summarize_metrics(records[:1])


def test_flex_attention_options_are_applied():
    from modeling_beitv2 import attention

    previous = attention.get_flex_attention_options()
    try:
        options = bench_gpu.apply_flex_attention_options('{"kernel_options": {"BLOCK_M": 32}, "compile": false}')
        assert options == {"kernel_options": {"BLOCK_M": 32}, "compile": False}
        current = attention.get_flex_attention_options()
        assert current.kernel_options == {"BLOCK_M": 32} and current.compile is False
    finally:
        attention.set_flex_attention_options(previous.kernel_options, previous.compile, previous.compile_mode)
    for bad in ("[1, 2]", "{BLOCK_M: 32}"):
        with pytest.raises(ValueError, match="JSON object"):
            bench_gpu.apply_flex_attention_options(bad)


def test_a_script_past_its_time_is_stopped_with_its_children(tmp_path):
    # The script starts a child (as DataLoader workers are) and both would sleep for a minute.
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "script.log"
    started = time.monotonic()
    assert gpu_cases_scripts.run_logged([sys.executable, "-c", code], dict(os.environ), log, timeout=3) is None
    assert time.monotonic() - started < 30
    child = int(log.read_text().split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the script's child process outlived the timeout")
    assert gpu_cases_scripts.run_logged([sys.executable, "-c", "pass"], dict(os.environ), log, timeout=60) == 0


def test_runs_without_datasets_and_skips_the_sections_that_need_it(tmp_path):
    # The GPU machine has no `datasets` unless wheels are carried: the model sections must not need it.
    code = textwrap.dedent(
        f"""
        import sys

        class BlockDatasets:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "datasets":
                    raise ModuleNotFoundError("No module named 'datasets' (blocked by the test)")

        sys.meta_path.insert(0, BlockDatasets())
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        import bench_gpu

        results = bench_gpu.main(["--quick", "--sections", "pipeline", "--output", {str(tmp_path / "r.md")!r}])
        assert "datasets" not in sys.modules
        print(results["sections"]["pipeline"]["status"], results["sections"]["pipeline"]["note"])
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    status_line = completed.stdout.strip().splitlines()[-1]
    assert status_line.startswith("skipped") and "datasets" in status_line
