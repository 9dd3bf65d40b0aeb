"""The pretraining scripts' arguments: parse-time validation, precision flags, warmup, lr, schedules, trackers, Hub."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import EXAMPLES_DIR
from pretraining_arguments import (
    DataArguments,
    PretrainingArguments,
    build_lr_scheduler,
    check_hub_access,
    check_range,
    check_report_to,
    parse_arguments,
    resolve_learning_rate,
    resolve_training_steps,
    resolve_warmup_steps,
    total_batch_size,
)
from transformers import get_cosine_with_min_lr_schedule_with_warmup

CLASSES = (DataArguments, PretrainingArguments)


@pytest.fixture(autouse=True)
def no_launcher_precision(monkeypatch):
    # `accelerate launch` exports this; the tests must not depend on the shell they run in.
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


def parse(*flags: str, classes: tuple[type, ...] = CLASSES):
    return parse_arguments(classes, ["--train_dir", "images", "--output_dir", "out", *flags])


def training_args(**overrides) -> PretrainingArguments:
    return PretrainingArguments(**{"output_dir": "out", **overrides})


# ---------------------------------------------------------------------------------------------------------------
# check_range


def test_check_range_messages():
    check_range("drop_path_rate", None, low=0)  # unset optional argument
    check_range("drop_path_rate", 0.0, low=0, high=1, high_inclusive=False)
    with pytest.raises(ValueError, match=r"^--drop_path_rate must be in \[0, 1\), got 1\.0\.$"):
        check_range("drop_path_rate", 1.0, low=0, high=1, high_inclusive=False)
    with pytest.raises(ValueError, match=r"^--mask_ratio must be in \(0, 1\], got 0\.$"):
        check_range("--mask_ratio", 0, low=0, high=1, low_inclusive=False)
    with pytest.raises(ValueError, match=r"^--logging_steps must be >= 1, got 0\.$"):
        check_range("logging_steps", 0, low=1)
    with pytest.raises(ValueError, match=r"^--lr must be > 0, got -1\. Use a positive value\.$"):
        check_range("lr", -1, low=0, low_inclusive=False, note="Use a positive value")
    with pytest.raises(ValueError, match=r"^--x must be <= 2, got 3\.$"):
        check_range("x", 3, high=2)
    with pytest.raises(ValueError, match="got nan"):  # NaN compares False with everything
        check_range("x", math.nan, low=0)
    with pytest.raises(ValueError, match="must be a number, got True"):
        check_range("x", True, low=0)
    with pytest.raises(ValueError, match=r"must be a number, got '1e-4' of type str \(in YAML write"):
        check_range("learning_rate", "1e-4", low=0)


# ---------------------------------------------------------------------------------------------------------------
# Parse-time validation (fault 7)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--logging_steps", "0"], r"--logging_steps must be >= 1, got 0"),
        (["--gradient_accumulation_steps", "0"], r"--gradient_accumulation_steps must be >= 1, got 0"),
        (["--max_consecutive_nonfinite", "0"], r"--max_consecutive_nonfinite must be >= 1, got 0"),
        (["--save_steps", "-5"], r"--save_steps must be >= 0, got -5\. 0 saves only at the end"),
        (["--save_total_limit", "0"], r"--save_total_limit must be >= 1"),
        (["--eval_steps", "0", "--do_eval", "--train_val_split", "0.1"], r"--eval_steps must be >= 1"),
        (["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size must be >= 1"),
        (["--per_device_eval_batch_size", "0"], r"--per_device_eval_batch_size must be >= 1"),
        (["--learning_rate", "0"], r"--learning_rate must be > 0"),
        (["--min_learning_rate=-1e-5"], r"--min_learning_rate must be >= 0"),
        (["--weight_decay", "-0.1"], r"--weight_decay must be >= 0"),
        (["--adam_beta2", "1.0"], r"--adam_beta2 must be in \[0, 1\)"),
        (["--adam_epsilon", "0"], r"--adam_epsilon must be > 0"),
        (["--max_grad_norm", "0"], r"--max_grad_norm must be > 0, got 0\.0\. Leave it unset"),
        (["--max_steps", "0"], r"--max_steps must be >= 1, got 0\. Use -1 to train for --num_train_epochs"),
        (["--num_train_epochs", "0"], r"--num_train_epochs must be > 0"),
        (["--warmup_steps", "-0.1"], r"--warmup_steps must be >= 0"),
        (["--warmup_steps", "2.5"], r"--warmup_steps must be a whole number of steps \(>= 1\) or a fraction"),
        (["--lr_scheduler_type", "cosine_typo"], r"--lr_scheduler_type must be one of cosine_with_min_lr, "),
        # Needs an eval metric at every step, which this loop does not give the scheduler.
        (["--lr_scheduler_type", "reduce_lr_on_plateau"], r"--lr_scheduler_type must be one of"),
        (["--report_to", "mlflow"], r"--report_to must be one of none, tensorboard, wandb, all; got 'mlflow'"),
        (["--mixed_precision", "fp8"], r"--mixed_precision must be one of no, fp16, bf16"),
        (["--resume_from_checkpoint", "no/such/folder"], r"must be 'latest' or an existing checkpoint folder"),
        (["--max_train_samples", "0"], r"--max_train_samples must be >= 1"),
        (["--max_eval_samples", "0", "--do_eval", "--train_val_split", "0.1"], r"--max_eval_samples must be >= 1"),
        (["--shuffle_buffer_size", "-1"], r"--shuffle_buffer_size must be >= 0, got -1\. 0 disables shuffling"),
        (["--dataloader_num_workers", "-1"], r"--dataloader_num_workers must be >= 0"),
        (["--train_val_split", "1.0"], r"--train_val_split must be in \(0, 1\), got 1\.0"),
        (["--train_val_split", "0"], r"--train_val_split must be in \(0, 1\), got 0\.0"),
        (["--dataset_name", "some/data"], r"exactly one training source.*got --dataset_name, --train_dir"),
        (["--validation_split", "validation"], r"--validation_split 'validation' names a split of --dataset_name"),
        (
            ["--validation_dir", "val", "--train_val_split", "0.1"],
            r"at most one validation source.*got --validation_dir, --train_val_split",
        ),
    ],
)
def test_bad_values_fail_at_parse_time(flags, message):
    with pytest.raises(ValueError, match=message):
        parse(*flags)


def test_no_training_source_is_an_error():
    with pytest.raises(ValueError, match="exactly one training source: --dataset_name, --train_dir or --data_files"):
        parse_arguments(CLASSES, ["--output_dir", "out"])


def test_defaults_and_subclass_paper_defaults_parse(tmp_path):
    @dataclass
    class PaperArguments(PretrainingArguments):
        warmup_steps: float = field(default=10 / 300)
        max_grad_norm: float | None = field(default=3.0)

    data_args, args = parse("--resume_from_checkpoint", str(tmp_path), classes=(DataArguments, PaperArguments))
    assert data_args.train_dir == "images" and data_args.validation_sources() == []
    assert args.warmup_steps == pytest.approx(10 / 300) and args.max_grad_norm == 3.0
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.min_learning_rate == 1e-5
    assert args.mixed_precision == "no" and not args.bf16 and not args.fp16
    assert args.report_to == "none" and args.token is None and args.model_revision == "main"


def test_yaml_and_json_files(tmp_path):
    settings = {"train_dir": "images", "output_dir": "out", "warmup_steps": 0.05, "bf16": True, "max_steps": 7}
    (tmp_path / "args.json").write_text(json.dumps(settings))
    (tmp_path / "args.yaml").write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))
    for name in ("args.json", "args.yaml"):
        data_args, args = parse_arguments(CLASSES, [str(tmp_path / name)])
        assert data_args.train_dir == "images" and args.max_steps == 7
        assert args.warmup_steps == 0.05 and args.mixed_precision == "bf16"
    # YAML 1.1 reads 1e-4 (no dot) as a string: a clear error instead of a TypeError deep in the loop.
    (tmp_path / "bad.yaml").write_text("train_dir: images\noutput_dir: out\nlearning_rate: 1e-4\n")
    with pytest.raises(ValueError, match=r"--learning_rate must be a number, got '1e-4'.*1\.0e-4"):
        parse_arguments(CLASSES, [str(tmp_path / "bad.yaml")])
    (tmp_path / "list.yaml").write_text("- --train_dir\n- images\n")
    with pytest.raises(ValueError, match="must hold a mapping of argument names to values, not list"):
        parse_arguments(CLASSES, [str(tmp_path / "list.yaml")])


@pytest.mark.parametrize(
    ("option", "replacement"),
    [
        ("warmup_ratio", "--warmup_steps takes a fraction"),
        ("hub_token", "--token"),
        ("log_example_ids", "the audit"),
    ],
)
def test_removed_options_say_what_replaces_them(tmp_path, option, replacement):
    with pytest.raises(ValueError, match=rf"--{option} was removed: {replacement}"):
        parse(f"--{option}", "0.05")
    with pytest.raises(ValueError, match=rf"--{option}=0.05 was removed|--{option} was removed"):
        parse(f"--{option.replace('_', '-')}=0.05")
    (tmp_path / "args.json").write_text(json.dumps({"train_dir": "i", "output_dir": "o", option: 0.05}))
    with pytest.raises(ValueError, match=rf"--{option} in args.json was removed: {replacement}"):
        parse_arguments(CLASSES, [str(tmp_path / "args.json")])


def test_a_removed_name_a_script_defines_again_parses():
    @dataclass
    class ScriptArguments:
        warmup_ratio: float = 0.0

    _, _, script_args = parse("--warmup_ratio", "0.1", classes=(*CLASSES, ScriptArguments))
    assert script_args.warmup_ratio == 0.1


# ---------------------------------------------------------------------------------------------------------------
# Evaluation arguments


def test_do_eval_needs_a_validation_source():
    with pytest.raises(ValueError, match="--do_eval needs .*--validation_dir.*--validation_split.*--train_val_split"):
        parse("--do_eval")
    data_args, args = parse("--do_eval", "--validation_dir", "val", "--eval_steps", "50")
    assert args.do_eval and args.eval_steps == 50 and data_args.validation_sources() == ["--validation_dir"]
    data_args, _ = parse("--do_eval", "--train_val_split", "0.1", "--max_eval_samples", "100")
    assert data_args.train_val_split == 0.1 and data_args.max_eval_samples == 100
    data_args, _ = parse_arguments(
        CLASSES, ["--dataset_name", "d", "--validation_split", "validation", "--do_eval", "--output_dir", "o"]
    )
    assert data_args.validation_sources() == ["--validation_split"]


def test_eval_options_without_do_eval_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="pretraining_arguments"):
        parse("--validation_dir", "val", "--eval_steps", "10")
    assert "--validation_dir, --eval_steps given without --do_eval: no evaluation will run." in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretraining_arguments"):
        parse()
    assert caplog.text == ""


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], "no"),
        (["--bf16"], "bf16"),
        (["--fp16"], "fp16"),
        (["--mixed_precision", "bf16"], "bf16"),
        (["--mixed_precision", "fp16"], "fp16"),
        (["--mixed_precision", "no"], "no"),
        (["--bf16", "--mixed_precision", "bf16"], "bf16"),  # the same choice twice is not a conflict
    ],
)
def test_precision_flags(flags, expected):
    _, args = parse(*flags)
    assert args.mixed_precision == expected
    assert (args.bf16, args.fp16) == (expected == "bf16", expected == "fp16")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bf16", "--fp16"], "--bf16 and --fp16 exclude each other"),
        (["--bf16", "--mixed_precision", "no"], "--bf16 conflicts with --mixed_precision no"),
        (["--fp16", "--mixed_precision", "bf16"], "--fp16 conflicts with --mixed_precision bf16"),
    ],
)
def test_conflicting_precision_flags(flags, message):
    with pytest.raises(ValueError, match=message):
        parse(*flags)


def test_precision_follows_accelerate_launch_unless_given(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert parse()[1].mixed_precision == "bf16"
    assert parse("--mixed_precision", "no")[1].mixed_precision == "no"
    assert parse("--fp16")[1].mixed_precision == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match="ACCELERATE_MIXED_PRECISION='fp8'"):
        parse()


# ---------------------------------------------------------------------------------------------------------------
# Batch, steps, warmup, learning rate


def test_total_batch_and_training_steps():
    args = training_args(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_train_epochs=2.5)
    assert total_batch_size(args, num_processes=2) == 24
    assert resolve_training_steps(args, num_examples=240, num_processes=2) == 25  # 10 steps per epoch x 2.5
    assert resolve_training_steps(args, num_examples=5, num_processes=2) == 3  # at least one step per epoch
    assert resolve_training_steps(training_args(max_steps=7), num_examples=None, num_processes=2) == 7
    with pytest.raises(ValueError, match="unknown for this stream.*give --max_steps"):
        resolve_training_steps(args, num_examples=None, num_processes=2)
    with pytest.raises(ValueError, match="--num_processes must be >= 1"):
        total_batch_size(args, num_processes=0)


def test_warmup_steps_count_or_fraction(caplog):
    assert resolve_warmup_steps(training_args(warmup_steps=0), 100) == 0
    assert resolve_warmup_steps(training_args(warmup_steps=0.05), 100) == 5
    assert resolve_warmup_steps(training_args(warmup_steps=10 / 300), 1000) == 34  # rounded up, as transformers
    assert resolve_warmup_steps(training_args(warmup_steps=0.05), 2) == 1
    assert resolve_warmup_steps(training_args(warmup_steps=1), 100) == 1  # 1 is a step count, not 100%
    assert resolve_warmup_steps(training_args(warmup_steps=20), 100) == 20
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="pretraining_arguments"):
        assert resolve_warmup_steps(training_args(warmup_steps=20), 10) == 20
    assert "The warmup (20 steps) lasts the whole run (10 steps)" in caplog.text


def test_learning_rate_scaling_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="pretraining_arguments"):
        lr = resolve_learning_rate(training_args(per_device_train_batch_size=128), 8, 1.5e-3, 2048)
    assert lr == pytest.approx(1.5e-3 / 2)
    assert "Peak learning rate 0.00075 (the paper's 0.0015 at batch 2048 scaled linearly" in caplog.text
    assert "WARNING" not in caplog.text
    assert resolve_learning_rate(training_args(learning_rate=3e-4), 8, 1.5e-3, 2048) == 3e-4


def test_learning_rate_below_min_lr_warns(caplog):
    # The README's smoke run: batch 8 on one process scales 1.5e-3 at 2048 down to 5.9e-6, below the 1e-5 floor.
    with caplog.at_level(logging.WARNING, logger="pretraining_arguments"):
        lr = resolve_learning_rate(training_args(per_device_train_batch_size=8), 1, 1.5e-3, 2048)
    assert lr == pytest.approx(5.859375e-6)
    assert (
        "The peak learning rate 5.86e-06 (the paper's 0.0015 at batch 2048 scaled linearly to the total batch 8) "
        "is not above --min_learning_rate 1e-05, so the cosine_with_min_lr schedule stays flat at it: a short run "
        "at this lr learns next to nothing; pass --learning_rate or use a larger total batch." in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretraining_arguments"):
        resolve_learning_rate(training_args(learning_rate=1e-6, lr_scheduler_type="linear"), 1, 1.5e-3, 2048)
    assert "(--learning_rate) is not above --min_learning_rate 1e-05: a short run" in caplog.text
    assert "raise --learning_rate or lower --min_learning_rate" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def lrs(scheduler, steps: int) -> list[float]:
    values = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    return values


def optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_cosine_with_min_lr_matches_the_plain_schedule_and_reaches_min_lr():
    args = training_args(warmup_steps=0.2, min_learning_rate=1e-5)
    ours = lrs(build_lr_scheduler(optimizer(), args, 20), 20)
    plain = lrs(get_cosine_with_min_lr_schedule_with_warmup(optimizer(), 4, 20, min_lr=1e-5), 20)
    assert ours == pytest.approx(plain, rel=1e-12, abs=0)
    assert ours[0] == 0 and ours[2] == pytest.approx(5e-4) and ours[4] == pytest.approx(1e-3)
    assert ours[-1] == pytest.approx(1e-5)
    assert all(later <= earlier for earlier, later in zip(ours[4:], ours[5:]))


def test_warmup_min_lr_schedule_ends_at_min_lr():
    args = training_args(warmup_steps=2, min_learning_rate=1e-4, lr_scheduler_type="cosine_warmup_with_min_lr")
    values = lrs(build_lr_scheduler(optimizer(), args, 10), 10)
    # transformers' variant starts the warmup above 0 and reaches the minimum at the last step that trains.
    assert values[:2] == pytest.approx([5e-4, 1e-3]) and values[9] == pytest.approx(1e-4)


def test_min_lr_above_peak_gives_a_flat_schedule():
    values = lrs(build_lr_scheduler(optimizer(1e-6), training_args(min_learning_rate=1e-5), 10), 10)
    assert values == pytest.approx([1e-6] * 11)


def test_linear_and_constant_with_warmup_schedules():
    linear = lrs(build_lr_scheduler(optimizer(), training_args(warmup_steps=2, lr_scheduler_type="linear"), 10), 10)
    assert linear[:3] == pytest.approx([0, 5e-4, 1e-3]) and linear[6] == pytest.approx(5e-4) and linear[-1] == 0
    args = training_args(warmup_steps=0.5, lr_scheduler_type="constant_with_warmup")
    constant = lrs(build_lr_scheduler(optimizer(), args, 4), 8)
    assert constant == pytest.approx([0, 5e-4] + [1e-3] * 7)


# ---------------------------------------------------------------------------------------------------------------
# Trackers


def test_report_to(monkeypatch):
    import pretraining_arguments

    monkeypatch.setattr(pretraining_arguments, "is_tensorboard_available", lambda: True)
    monkeypatch.setattr(pretraining_arguments, "is_wandb_available", lambda: False)
    assert check_report_to("none") is None
    assert check_report_to("tensorboard") == ["tensorboard"]
    assert check_report_to("all") == ["tensorboard"]
    with pytest.raises(ValueError, match="--report_to wandb needs the wandb package: pip install wandb, or pass"):
        check_report_to("wandb")
    monkeypatch.setattr(pretraining_arguments, "is_tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match=r"--report_to all found no tracker installed \(tensorboard, wandb\)"):
        check_report_to("all")
    with pytest.raises(ValueError, match="--report_to must be one of none, tensorboard, wandb, all"):
        check_report_to("comet_ml")


# ---------------------------------------------------------------------------------------------------------------
# Hub


class FakeHfApi:
    """Stands in for `huggingface_hub.HfApi`: records calls, answers or raises as told."""

    calls: list = []
    role = "write"
    whoami_error: Exception | None = None
    create_error: Exception | None = None

    def __init__(self, token=None):
        FakeHfApi.calls.append(("init", token))

    def whoami(self):
        if self.whoami_error is not None:
            raise self.whoami_error
        return {"name": "alice", "auth": {"accessToken": {"role": self.role}}}

    def create_repo(self, repo_id, exist_ok=False):
        FakeHfApi.calls.append(("create_repo", repo_id, exist_ok))
        if self.create_error is not None:
            raise self.create_error
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'alice/' + repo_id}")


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def one_line_exit(args) -> str:
    with pytest.raises(SystemExit) as raised:
        check_hub_access(args)
    message = str(raised.value.code)
    # No chained exception either: the user sees this one line, not the HTTP client's traceback.
    assert "\n" not in message and raised.value.__cause__ is None
    assert raised.value.__context__ is None or raised.value.__suppress_context__
    return message


def test_hub_access_without_push_does_nothing(fake_hub):
    assert check_hub_access(training_args()) is None
    assert fake_hub.calls == []


def test_hub_access_creates_the_repo_at_start(fake_hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pretraining_arguments")
    args = training_args(output_dir=str(tmp_path / "beitv2-tiny"), push_to_hub=True, token="hf_x")
    assert check_hub_access(args) == "alice/beitv2-tiny"
    assert fake_hub.calls == [("init", "hf_x"), ("create_repo", "beitv2-tiny", True)]
    args = training_args(push_to_hub=True, hub_model_id="org/model")
    assert check_hub_access(args) == "org/model"
    assert "Will push the final model to https://huggingface.co/org/model" in caplog.text


def test_hub_access_errors_are_one_line(fake_hub, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    args = training_args(push_to_hub=True, hub_model_id="org/model")
    monkeypatch.setattr(fake_hub, "whoami_error", LocalTokenNotFoundError("Token is required.\nSee the docs."))
    assert one_line_exit(args) == (
        "--push_to_hub needs a Hub token with write access: pass --token or run `hf auth login`."
    )
    monkeypatch.setattr(fake_hub, "whoami_error", None)
    monkeypatch.setattr(fake_hub, "role", "read")
    assert "the token of alice is read-only" in one_line_exit(args)
    monkeypatch.setattr(fake_hub, "role", "write")
    monkeypatch.setattr(
        fake_hub,
        "whoami_error",
        HfHubHTTPError("Invalid user token.", response=SimpleNamespace(status_code=401, headers={}, request=None)),
    )
    assert "(HfHubHTTPError: Invalid user token.)" in one_line_exit(args)
    monkeypatch.setattr(fake_hub, "whoami_error", None)
    monkeypatch.setattr(fake_hub, "create_error", ConnectionError("Connection refused\n  more details"))
    assert one_line_exit(args) == (
        "--push_to_hub: cannot use the Hub repo 'org/model' (ConnectionError: Connection refused). Check the token "
        "and the network, or drop --push_to_hub."
    )


def test_hub_access_offline_is_one_line(monkeypatch):
    # The real HfApi: offline mode makes its first request fail, with no network touched.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = one_line_exit(training_args(push_to_hub=True, hub_model_id="org/model", token="hf_fake"))
    assert message.startswith("--push_to_hub: cannot use the Hub repo 'org/model' (OfflineModeIsEnabled: ")
    assert "offline mode is enabled" in message
    with pytest.raises(SystemExit, match="'not a/valid repo' is not a valid repo id"):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self: {"name": "alice"})
        check_hub_access(training_args(push_to_hub=True, hub_model_id="not a/valid repo"))


def test_hub_access_offline_prints_no_traceback(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(EXAMPLES_DIR)!r})
        from pretraining_arguments import PretrainingArguments, check_hub_access
        check_hub_access(PretrainingArguments(output_dir={str(tmp_path)!r}, push_to_hub=True, token="hf_fake"))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("--push_to_hub: cannot use the Hub repo"), result.stderr
