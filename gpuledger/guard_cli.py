"""`gpuledger policies`: the guardrail policies file (what an idle GPU's owner is told, then what
is done about it, and when)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpuledger.cli_context import console, err
from gpuledger.output import plural

policies_app = typer.Typer(
    help="Guardrail policies: notify, announce, then act on idle GPUs (dry run by default).",
    no_args_is_help=True,
)


@policies_app.command("check")
def policies_check(
    file: Annotated[
        Path,
        typer.Argument(help="A TOML file of [[policy]] tables.", exists=True, dir_okay=False),
    ],
) -> None:
    """Check a policies file: every problem on a line of its own (exit 2), or what each policy
    matches and the ladder it climbs."""
    from gpuledger.errors import EXIT_USAGE
    from gpuledger.ledger.guard import PolicyError, parse_policies

    try:
        policies = parse_policies(file.read_text(), str(file))
    except PolicyError as exc:
        for line in str(exc).splitlines():
            err.print(line, style="red", markup=False)
        raise typer.Exit(EXIT_USAGE) from exc
    for policy in policies:
        scope = {**policy.match, **{f"label {k}": v for k, v in policy.match_labels.items()}}
        matched = ", ".join(f"{k}={v}" for k, v in scope.items()) or "every allocated GPU"
        ladder = " -> ".join(
            f"{step.kind}{f' {step.action.value}' if step.action else ''} +{step.after_minutes:g}m"
            for step in policy.steps
        )
        mode = "ENFORCED" if policy.enforce else "dry run"
        console.print(
            f"{policy.name}: {matched}; idle {policy.idle_minutes:g} min, then {ladder} ({mode})",
            markup=False,
        )
    console.print(f"{file}: {plural(len(policies), 'policy', 'policies')} ok", markup=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `gpuledger` app."""
    app.add_typer(policies_app, name="policies")
