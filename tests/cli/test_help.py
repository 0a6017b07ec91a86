"""Help that teaches: every sub-command shows an example, every option says what it does,
flags read as flags, and all of it fits an 80-column terminal."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from gpuledger import __version__
from gpuledger.cli import app
from gpuledger.examples import EXAMPLES

ROOT_COMMAND = typer.main.get_command(app)
SHELL_OPTIONS = {"--help", "--install-completion", "--show-completion"}


def commands(cmd: Any = ROOT_COMMAND, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    subs = getattr(cmd, "commands", None)
    if subs:
        for name, sub in subs.items():
            yield from commands(sub, (*path, name))
    else:
        yield path


def command_of(path: tuple[str, ...]) -> Any:
    cmd: Any = ROOT_COMMAND
    for name in path:
        cmd = cmd.commands[name]
    return cmd


ALL = sorted(commands())


def help_of(path: tuple[str, ...]) -> str:
    done = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert done.exit_code == 0, done.output
    return done.output


def test_every_command_is_found() -> None:
    assert ("query",) in ALL and ("jobs", "start") in ALL and len(ALL) >= 20


@pytest.mark.parametrize("path", ALL, ids=[" ".join(p) for p in ALL])
def test_a_commands_help_has_an_example_and_describes_every_option(
    path: tuple[str, ...],
) -> None:
    text = help_of(path)
    assert "Example" in text, f"`gpuledger {' '.join(path)} --help` shows no example"
    undescribed = [
        param.opts[-1]
        for param in command_of(path).params
        if param.param_type_name == "option"
        and not (param.help or "").strip()
        and not SHELL_OPTIONS & set(param.opts)
    ]
    assert not undescribed, f"options without a description: {undescribed}"
    assert "<bool>" not in text
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, too_wide


def test_the_root_help_fits_and_version_answers() -> None:
    assert all(len(line) <= 80 for line in help_of(()).splitlines())
    done = CliRunner().invoke(app, ["--version"])
    assert done.exit_code == 0 and done.output.strip() == f"gpuledger {__version__}"


def example_commands() -> list[list[str]]:
    """Each example of `gpuledger.examples`, continuation lines joined, as an argv."""
    found = []
    for lines in EXAMPLES.values():
        text = "\n".join(lines).replace("\\\n", " ")
        for line in text.splitlines():
            args = shlex.split(line, comments=True)
            while args and re.match(r"^[A-Z_]+=", args[0]):
                args.pop(0)  # an environment variable set for the command
            if ">" in args:
                args = args[: args.index(">")]  # the shell's redirection
            if "$(gpuledger" in args:  # a command whose output is another's arguments
                inner = args.index("$(gpuledger")
                found.append(["gpuledger", *(a.rstrip(")") for a in args[inner + 1 :])])
                args = [*args[:inner], "JOB-ID"]
            found.append(args)
    return found


@pytest.mark.parametrize("argv", example_commands(), ids=" ".join)
def test_every_example_parses_as_the_command_line_does(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert argv[0] == "gpuledger"
    monkeypatch.chdir(tmp_path)
    for arg in argv:  # the files an example reads exist, as they would for its user
        if re.fullmatch(r"[\w.-]+\.(jsonl|csv|sql|toml)", arg):
            (tmp_path / arg).touch()
    ctx = ROOT_COMMAND.make_context("gpuledger", argv[1:], resilient_parsing=False)
    group: Any = ROOT_COMMAND
    rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    while rest:
        name, cmd, rest = group.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx, resilient_parsing=False)
        group = cmd
        rest = (
            [*getattr(ctx, "_protected_args", []), *ctx.args]
            if getattr(cmd, "commands", None)
            else []
        )


def test_every_command_has_an_example_in_the_table() -> None:
    assert sorted(EXAMPLES) == sorted(" ".join(p) for p in ALL)
