"""Analysts' commands: export focus, recommend, report (issue 8)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `gpuledger` app."""
