"""What every command module shares: the settings a command runs with, and its two consoles."""

from __future__ import annotations

import typer
from rich.console import Console

from gpuledger.settings import Settings

# Lines are never wrapped into several: a pipe or a log keeps each whole.
console = Console(soft_wrap=True)
# Errors are one line each, never wrapped into several (a pipe or a log keeps them whole).
err = Console(stderr=True, soft_wrap=True)


def settings_of(ctx: typer.Context) -> Settings:
    """The settings `gpuledger`'s global options made (the app's callback puts them there)."""
    settings: Settings = ctx.obj
    return settings
