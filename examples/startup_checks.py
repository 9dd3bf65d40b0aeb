"""Checks, before training starts, that the run's outside services are usable: trackers and the Hub.

:func:`check_report_to` turns ``--report_to`` into the trackers to log with, refusing one that is not installed;
:func:`check_hub_access` checks the token and creates the Hub repo when ``--push_to_hub`` is set. Both fail at start
with a one-line message rather than after hours of training.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path

from accelerate.utils import is_tensorboard_available, is_wandb_available
from pretraining_arguments import REPORT_TO_CHOICES, PretrainingArguments, check_choice

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb")  # what `--report_to all` may select
# How to install each tracker transformers' Trainer can report to (the pretraining scripts offer tensorboard and
# wandb: TRACKERS).
_PIP_TRACKERS = ("clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "mlflow", "neptune", "swanlab", "trackio")
TRACKER_INSTALL_COMMANDS = {
    **{name: f"pip install {name}" for name in (*_PIP_TRACKERS, "wandb")},
    "tensorboard": 'pip install -e ".[tensorboard]" (this project\'s extra) or pip install tensorboard',
}


def check_report_to(report_to: str) -> list[str] | None:
    """The trackers for ``Accelerator(log_with=...)``: None for ``"none"``, else the backends' names.

    Raises:
        ValueError: at start, when a requested backend (or, for ``"all"``, every backend) is not installed, rather
            than a run that logs nothing.
    """
    check_choice("report_to", report_to, REPORT_TO_CHOICES)
    if report_to == "none":
        return None
    installed = [name for name in TRACKERS if _tracker_installed(name)]
    if report_to == "all":
        if not installed:
            raise ValueError(
                f"--report_to all found no tracker installed ({', '.join(TRACKERS)}): "
                f"{TRACKER_INSTALL_COMMANDS['tensorboard']} (or pip install wandb), or pass --report_to none."
            )
        return installed
    if report_to not in installed:
        raise ValueError(
            f"--report_to {report_to} needs the {report_to} package: {TRACKER_INSTALL_COMMANDS[report_to]}, or pass "
            "--report_to none."
        )
    return [report_to]


def _tracker_installed(name: str) -> bool:
    # Looked up at call time, so tests can patch the checks on this module.
    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]()


def _hub_network_errors() -> tuple[type[BaseException], ...]:
    """The errors of a failed Hub call: huggingface_hub's (all OSError) and the HTTP client's transport errors."""
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(client).HTTPError)
    return tuple(errors)


def check_hub_access(args: PretrainingArguments) -> str | None:
    """With ``--push_to_hub``, check the token and create the repo (or find it) now, before hours of training.

    The repo is ``--hub_model_id``, else the name of ``--output_dir`` (in the token's namespace). Safe to call on
    every rank (each exits with the same message) or only on the main process.

    Returns:
        The full repo id (``namespace/name``) to push to, or None without ``--push_to_hub``.

    Raises:
        SystemExit: with a one-line message (no traceback) when there is no token, the token is invalid or
            read-only, the repo cannot be created or written, or the Hub cannot be reached (e.g. ``HF_HUB_OFFLINE``).
    """
    if not args.push_to_hub:
        return None
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError

    repo_id = args.hub_model_id or Path(args.output_dir).absolute().name
    api = huggingface_hub.HfApi(token=args.token)
    try:
        identity = api.whoami()
        role = identity.get("auth", {}).get("accessToken", {}).get("role")
        if role == "read":
            raise SystemExit(
                f"--push_to_hub: the token of {identity.get('name', 'this user')} is read-only; pass a token with "
                "write access (--token or `hf auth login`)."
            )
        repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    except LocalTokenNotFoundError:
        raise SystemExit(
            "--push_to_hub needs a Hub token with write access: pass --token or run `hf auth login`."
        ) from None
    except HFValidationError as error:
        raise SystemExit(f"--push_to_hub: {repo_id!r} is not a valid repo id ({_first_line(error)}).") from None
    except _hub_network_errors() as error:
        raise SystemExit(
            f"--push_to_hub: cannot use the Hub repo {repo_id!r} ({type(error).__name__}: {_first_line(error)}). "
            "Check the token and the network, or drop --push_to_hub."
        ) from None
    logger.info("Will push the final model to %s/%s", huggingface_hub.constants.ENDPOINT, repo_id)
    return repo_id


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "no details"
