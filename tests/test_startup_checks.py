"""Start-up checks of the pretraining scripts (examples/pretraining/arguments.py): trackers installed, Hub repo writable."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import huggingface_hub
import pytest
from conftest import EXAMPLES_DIR

from pretraining.arguments import check_hub_access, check_report_to

# ---------------------------------------------------------------------------------------------------------------
# Trackers


def test_report_to(monkeypatch):
    import pretraining.arguments as startup_checks

    monkeypatch.setattr(startup_checks, "is_tensorboard_available", lambda: True)
    monkeypatch.setattr(startup_checks, "is_wandb_available", lambda: False)
    assert check_report_to("none") is None
    assert check_report_to("tensorboard") == ["tensorboard"]
    assert check_report_to("all") == ["tensorboard"]
    with pytest.raises(ValueError, match="--report_to wandb needs the wandb package: pip install wandb, or pass"):
        check_report_to("wandb")
    monkeypatch.setattr(startup_checks, "is_tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match=r"--report_to all found no tracker installed \(tensorboard, wandb\)"):
        check_report_to("all")
    with pytest.raises(ValueError, match=r'pip install -e "\.\[tensorboard\]" \(this project'):
        check_report_to("tensorboard")
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


def hub_settings(**values) -> dict:
    """check_hub_access's values: no push, no repo id, output_dir "out", no token, unless given."""
    return {"push_to_hub": False, "hub_model_id": None, "output_dir": "out", "token": None, **values}


def one_line_exit(settings: dict) -> str:
    with pytest.raises(SystemExit) as raised:
        check_hub_access(**settings)
    message = str(raised.value.code)
    # No chained exception either: the user sees this one line, not the HTTP client's traceback.
    assert "\n" not in message and raised.value.__cause__ is None
    assert raised.value.__context__ is None or raised.value.__suppress_context__
    return message


def test_hub_access_without_push_does_nothing(fake_hub):
    assert check_hub_access(**hub_settings()) is None
    assert fake_hub.calls == []


def test_hub_access_creates_the_repo_at_start(fake_hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pretraining.arguments")
    args = hub_settings(output_dir=str(tmp_path / "beitv2-tiny"), push_to_hub=True, token="hf_x")
    assert check_hub_access(**args) == "alice/beitv2-tiny"
    assert fake_hub.calls == [("init", "hf_x"), ("create_repo", "beitv2-tiny", True)]
    args = hub_settings(push_to_hub=True, hub_model_id="org/model")
    assert check_hub_access(**args) == "org/model"
    assert "Will push the final model to https://huggingface.co/org/model" in caplog.text


def test_hub_access_errors_are_one_line(fake_hub, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    args = hub_settings(push_to_hub=True, hub_model_id="org/model")
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
    message = one_line_exit(hub_settings(push_to_hub=True, hub_model_id="org/model", token="hf_fake"))
    assert message.startswith("--push_to_hub: cannot use the Hub repo 'org/model' (OfflineModeIsEnabled: ")
    assert "offline mode is enabled" in message
    # --hub_model_id is checked at parse time; a repo named after --output_dir is checked here.
    with pytest.raises(SystemExit, match="'not a valid repo' is not a valid repo id"):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self: {"name": "alice"})
        check_hub_access(**hub_settings(push_to_hub=True, output_dir="runs/not a valid repo"))


def test_hub_access_offline_prints_no_traceback(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(EXAMPLES_DIR)!r})
        from pretraining.arguments import check_hub_access
        check_hub_access(push_to_hub=True, hub_model_id=None, output_dir={str(tmp_path)!r}, token="hf_fake")
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("--push_to_hub: cannot use the Hub repo"), result.stderr
