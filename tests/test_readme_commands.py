"""Every command in the README's code blocks names a script that exists and only arguments that script accepts.

Each command is run up to its argument parsing (intercepted once argparse has read every flag), so a renamed or
removed flag, a typo in a copy-paste command, or a launch config that moved fails here instead of on a user's
cluster.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


class ParsedArguments(Exception):
    """Raised right after a script's arguments were parsed successfully."""


def readme_commands() -> list[list[str]]:
    """The `python examples/...` and `accelerate launch ... examples/...` commands of the README's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(("python examples/", "accelerate launch")) and "examples/" in line:
                commands.append(shlex.split(line))
    return commands


def split_command(command: list[str]) -> tuple[str, list[str], list[str]]:
    """(script name, launcher options, script arguments)."""
    script_index = next(
        index for index, word in enumerate(command) if word.startswith("examples/") and word.endswith(".py")
    )
    script = Path(command[script_index])
    assert (REPO / script).is_file(), f"{script} does not exist"
    return script.stem, command[:script_index], command[script_index + 1 :]


COMMANDS = readme_commands()


def test_the_readme_has_the_pipeline_commands():
    scripts = {split_command(command)[0] for command in COMMANDS}
    expected = {"run_vqkd", "run_mim", "run_image_classification", "run_linear_probe", "run_semantic_segmentation"}
    assert expected <= scripts, scripts


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(command[:6]) for command in COMMANDS])
def test_readme_command_parses(command, monkeypatch):
    script, launcher, arguments = split_command(command)
    if "--config_file" in launcher:
        config_file = launcher[launcher.index("--config_file") + 1]
        assert (REPO / config_file).is_file(), f"launch config {config_file} does not exist"
    if "--kind" in arguments and arguments[arguments.index("--kind") + 1] == "KIND":
        pytest.skip("a template with placeholders, not a command")

    parse_known_args = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, *args, **kwargs):
        # Every flag must exist and every value must convert; building the dataclasses is left out because
        # TrainingArguments refuses GPU-only settings such as --bf16 on this CPU machine.
        namespace, unknown = parse_known_args(self, *args, **kwargs)
        assert not unknown, f"{script}.py does not accept {unknown}"
        raise ParsedArguments

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [f"examples/{script}.py", *arguments])
    monkeypatch.chdir(REPO)
    module = importlib.import_module(script)
    with pytest.raises(ParsedArguments):
        module.main()
