"""Grafana and scheduler commands: grafana export|sync, k8s watch (issue 9)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `gpuledger` app."""
