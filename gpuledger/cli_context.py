"""What every command module shares: the settings a command runs with, its two consoles, how
a group of commands is made, and the options that listing commands spell alike."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console

from gpuledger.settings import Settings

# Lines are never wrapped into several: a pipe or a log keeps each whole.
console = Console(soft_wrap=True)
# Errors are one line each, never wrapped into several (a pipe or a log keeps them whole).
err = Console(stderr=True, soft_wrap=True)


def command_group(help: str) -> typer.Typer:
    """A group of commands (`gpuledger db ...`): called without one, it shows its help."""
    return typer.Typer(help=help, no_args_is_help=True)


def settings_of(ctx: typer.Context) -> Settings:
    """The settings `gpuledger`'s global options made (the app's callback puts them there)."""
    settings: Settings = ctx.obj
    return settings


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output: table, json or csv.")]
LimitOpt = Annotated[int, typer.Option(help="At most this many, newest first.")]
