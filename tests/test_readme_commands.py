"""Every command in the code blocks of README.md and docs/*.md names a script that exists and only arguments that
script accepts.

Each command is run up to its argument parsing (intercepted once argparse has read every flag), so a renamed or
removed flag, a typo in a copy-paste command, or a launch config that moved fails here instead of on a user's
cluster. Blocks marked ``<!-- not-run: reason -->`` (templates with placeholders) are left out; the Markdown parsing
here is shared with tests/test_docs_code_blocks.py, which runs the ```python blocks.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```(\S*)\s*$")
_NOT_RUN = re.compile(r"^<!--\s*not-run:(.*?)-->\s*$")


class ParsedArguments(Exception):
    """Raised right after a script's arguments were parsed successfully."""


@dataclass(frozen=True)
class MarkdownBlock:
    """One fenced code block of a Markdown page."""

    language: str  # the word after the opening fence ("" if none)
    code: str
    line: int  # 1-based line of the opening fence
    not_run: str | None  # the reason given by a `<!-- not-run: reason -->` line right before the block


def fenced_blocks(page: Path) -> list[MarkdownBlock]:
    """The fenced (```) code blocks of `page`, in order. An unclosed fence is an error."""
    lines = page.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        start = index
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            index += 1
        if index == len(lines):
            raise ValueError(f"{page}:{start + 1}: the code block is never closed")
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = _NOT_RUN.match(previous.strip())
        code = "\n".join(lines[start + 1 : index]) + "\n"
        blocks.append(MarkdownBlock(opening.group(1), code, start + 1, marker.group(1).strip() if marker else None))
        index += 1
    return blocks


def bash_commands(pages: list[Path]) -> list[tuple[str, list[str]]]:
    """(page, command) for the `python examples/...` and `accelerate launch ... examples/...` commands of the pages'
    bash blocks."""
    commands = []
    for page in pages:
        for block in fenced_blocks(page):
            if block.language != "bash" or block.not_run is not None:
                continue
            joined = re.sub(r"\\\n\s*", " ", block.code)
            for line in joined.splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith(("python examples/", "accelerate launch")) and "examples/" in line:
                    commands.append((page.relative_to(REPO).as_posix(), shlex.split(line)))
    return commands


def split_command(command: list[str]) -> tuple[str, list[str], list[str]]:
    """(script name, launcher options, script arguments)."""
    script_index = next(
        index for index, word in enumerate(command) if word.startswith("examples/") and word.endswith(".py")
    )
    script = Path(command[script_index])
    assert (REPO / script).is_file(), f"{script} does not exist"
    return script.stem, command[:script_index], command[script_index + 1 :]


COMMANDS = bash_commands(DOC_PAGES)


def test_the_readme_has_the_pipeline_commands():
    scripts = {split_command(command)[0] for _, command in bash_commands([README])}
    expected = {"run_vqkd", "run_mim", "run_image_classification", "run_linear_probe", "run_semantic_segmentation"}
    assert expected <= scripts, scripts


@pytest.mark.parametrize(
    ("page", "command"), COMMANDS, ids=[f"{page}: {' '.join(command[:6])}" for page, command in COMMANDS]
)
def test_documented_command_parses(page, command, monkeypatch):
    script, launcher, arguments = split_command(command)
    if "--config_file" in launcher:
        config_file = launcher[launcher.index("--config_file") + 1]
        assert (REPO / config_file).is_file(), f"{page}: launch config {config_file} does not exist"

    parse_known_args = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, *args, **kwargs):
        # Every flag must exist and every value must convert; building the dataclasses is left out because
        # TrainingArguments refuses GPU-only settings such as --bf16 on this CPU machine.
        namespace, unknown = parse_known_args(self, *args, **kwargs)
        assert not unknown, f"{page}: {script}.py does not accept {unknown}"
        raise ParsedArguments

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [f"examples/{script}.py", *arguments])
    monkeypatch.chdir(REPO)
    module = importlib.import_module(script)
    with pytest.raises(ParsedArguments):
        module.main()


DOCUMENTED_SCRIPTS = sorted({split_command(command)[0] for _, command in COMMANDS})


@pytest.mark.parametrize("script", DOCUMENTED_SCRIPTS)
def test_documented_script_help_renders(script, monkeypatch, capsys):
    # `--help` is the first thing a reader of these pages runs. argparse %-formats every help string, so a bare "%"
    # in one field's help ("99.9% of patches") crashes the whole listing with a TypeError.
    monkeypatch.setattr(sys, "argv", [f"examples/{script}.py", "--help"])
    monkeypatch.chdir(REPO)
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
