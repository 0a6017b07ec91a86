"""Alerting commands: `alerts` lists what the worker raised, `budgets load|show`.

The worker decides and delivers alerts (streams/alerting.py); these commands read and write
the store only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gpuledger.cli_context import Format, FormatOpt, LimitOpt, command_group, settings_of
from gpuledger.ledger.timekeys import iso_utc
from gpuledger.output import money, plural, print_csv, print_json

# No markup: messages carry labels and dollar amounts as they are.
console = Console(markup=False, soft_wrap=True)
err = Console(stderr=True, markup=False, soft_wrap=True)

budgets_app = command_group("Monthly GPU budgets per team or project (budget_burn alerts).")


class Kind(StrEnum):
    idle_allocated_gpu = "idle_allocated_gpu"
    budget_burn = "budget_burn"
    orphaned_gpu_memory = "orphaned_gpu_memory"


def parse_since(value: str, now: float | None = None) -> float:
    """A duration before now (`30min`, `2h`, `7d`), epoch seconds, or an ISO 8601 time (UTC
    if unzoned). `now` defaults to the wall clock; the command passes the store's "now"."""
    from gpuledger.analysts.window import WindowError, parse_period, parse_time

    text = value.strip()
    try:
        return parse_time(text, "--since").timestamp()
    except WindowError:
        pass
    try:
        length = parse_period(text)
    except WindowError as exc:
        raise typer.BadParameter(
            f"--since {value!r}: give a duration (30min, 2h, 7d), epoch seconds or an ISO 8601 "
            f"time (2026-01-05T10:00:00Z); {exc}"
        ) from None
    return (time.time() if now is None else now) - length.total_seconds()


def _store(ctx: typer.Context) -> Any:
    from gpuledger.runtime import connect_store

    return connect_store(settings_of(ctx))


# `gpuledger alerts` filters the latest rows of the worker's own query (streams/sql.py).
LIST_WHERE = (
    "({firing:UInt8} = 0 OR l.state = 'firing') "
    "AND l.ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')"
)
LIST_TAIL = "ORDER BY l.ts DESC\nLIMIT {limit:UInt32}"
# The columns given in epoch milliseconds, shown in seconds.
_MS_FIELDS = (0, 9, 13)

FIELDS = [
    "ts", "kind", "rule", "state", "gpu_uuid", "node", "job_id", "team", "project", "since",
    "idle_seconds", "wasted_usd", "message", "fired_at",
]  # fmt: skip


def list_alerts(
    client: Any, *, firing: bool, since: float | None, kinds: list[str], limit: int
) -> list[dict[str, Any]]:
    from gpuledger.streams.sql import latest_alerts

    result = client.query(
        latest_alerts(LIST_WHERE, LIST_TAIL),
        parameters={
            "kinds": kinds,
            "firing": int(firing),
            "since": round((since or 0.0) * 1000),
            "limit": limit,
        },
    )
    return [dict(zip(FIELDS, _in_seconds(row), strict=True)) for row in result.result_rows]


def _in_seconds(row: Sequence[Any]) -> list[Any]:
    values = list(row)
    for i in _MS_FIELDS:
        if values[i] is not None:
            values[i] = values[i] / 1000
    return values


def alerts_command(
    ctx: typer.Context,
    firing: Annotated[bool, typer.Option("--firing", help="Only the alerts firing now.")] = False,
    since: Annotated[
        str | None,
        typer.Option(
            help="Only alerts whose latest change is this recent: 30min, 2h, 7d (before now, "
            "the end of the newest cost fact in the store), epoch seconds or ISO 8601 (UTC)."
        ),
    ] = None,
    kind: Annotated[list[Kind] | None, typer.Option(help="Only this kind (repeatable).")] = None,
    limit: LimitOpt = 100,
    format: FormatOpt = Format.table,
) -> None:
    """List the alerts the worker raised: idle allocated GPUs and budget burn, one row each
    (its latest state), newest first."""
    from gpuledger.analysts.window import data_now, fact_span

    if since:
        parse_since(since)  # a bad option is refused before connecting
    kinds = [k.value for k in (kind or list(Kind))]
    client = _store(ctx)
    start = parse_since(since, data_now(fact_span(client)).timestamp()) if since else None
    found = list_alerts(client, firing=firing, since=start, kinds=kinds, limit=limit)
    if format is Format.json:
        print_json([_jsonable(a) for a in found])
    elif format is Format.csv:
        print_csv(FIELDS, ([_jsonable(a)[f] for f in FIELDS] for a in found))
    else:
        console.print(_table(found, wide=console.width >= 160))
        if found and console.width < 160:
            err.print("(the messages: --format json, or a wider terminal)")
    n_firing = sum(1 for a in found if a["state"] == "firing")
    wasted = sum(a["wasted_usd"] for a in found if a["kind"] != Kind.budget_burn.value)
    err.print(
        f"{plural(len(found), 'alert')}, {n_firing} firing; idle GPUs and orphaned memory "
        "in them wasted "
        f"{money(wasted)}" + (" (newest first; --limit to see more)" if len(found) == limit else "")
    )


def _jsonable(alert: dict[str, Any]) -> dict[str, Any]:
    out = dict(alert)
    for name in ("ts", "since", "fired_at"):
        out[name] = iso_utc(out[name]) if out[name] else None
    return out


def _table(alerts: list[dict[str, Any]], wide: bool) -> Table:
    table = Table(show_lines=False, header_style="bold")
    columns = ["state", "alert", "where", "job", "team/project", "since (UTC)", "idle", "$"]
    if wide:
        columns.append("message")
    for col in columns:
        table.add_column(
            col,
            justify="right" if col in ("idle", "$") else "left",
            overflow="fold",
            no_wrap=col in ("state", "since (UTC)", "idle", "$"),
        )
    for a in alerts:
        state = Text(a["state"], style="bold red" if a["state"] == "firing" else "green")
        where = " ".join(p for p in (a["node"], a["gpu_uuid"]) if p) or "—"
        kind = {
            Kind.idle_allocated_gpu.value: "idle GPU",
            Kind.orphaned_gpu_memory.value: "orphaned memory",
        }.get(a["kind"], "budget")
        if a["rule"]:
            kind += f" {a['rule']}"
        owner = "/".join(p for p in (a["team"], a["project"]) if p) or "—"
        idle = f"{a['idle_seconds'] / 60:,.0f} min" if a["idle_seconds"] else ""
        since = datetime.fromtimestamp(a["since"], UTC).strftime("%Y-%m-%d %H:%M")
        row = [state, kind, where, a["job_id"] or "—", owner, since, idle,
               f"{a['wasted_usd']:,.2f}"]  # fmt: skip
        if wide:
            row.append(a["message"])
        table.add_row(*row)
    return table


# -- budgets -----------------------------------------------------------------------------


@budgets_app.command("load")
def budgets_load(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with the header month,team,project,budget_usd: month YYYY-MM or * (every "
            "month), an empty team or project matches any.",
            exists=True,
            dir_okay=False,
        ),
    ],
    replace: Annotated[
        bool,
        typer.Option(help="Also remove the budgets this file does not list."),
    ] = False,
) -> None:
    """Load monthly budgets (USD) into the store; the worker checks spend against them."""
    from gpuledger.ledger.budgets import BudgetError, load_budgets
    from gpuledger.streams.budgets import store_budgets

    try:
        budgets = load_budgets(file)
    except BudgetError as exc:
        err.print(str(exc))
        raise typer.Exit(2) from exc
    client = _store(ctx)
    removed = store_budgets(client, budgets, source=file.name, replace=replace, now=time.time())
    total = sum(b.budget_usd for b in budgets)
    console.print(
        f"loaded {plural(len(budgets), 'budget')} ({money(total)} in all) from {file}"
        + (f"; removed {removed} not in the file" if replace else "")
    )


@budgets_app.command("show")
def budgets_show(
    ctx: typer.Context,
    format: FormatOpt = Format.table,
) -> None:
    """Budgets in force this month (event time: the newest fact's) with spend so far and the
    month's end at the last hour's rate."""
    from gpuledger.analysts.window import data_now, fact_span
    from gpuledger.ledger.budgets import month_of
    from gpuledger.streams.budgets import budget_status

    client = _store(ctx)
    span = fact_span(client)
    as_of, statuses = budget_status(client, data_now(span).timestamp() if span else None)
    rows: list[dict[str, Any]] = [
        {
            "month": month_of(as_of) if as_of else "",
            "team": s.budget.team,
            "project": s.budget.project,
            "budget_usd": s.budget.budget_usd,
            "month_to_date_usd": s.month_to_date_usd,
            "used_pct": round(s.used * 100, 1),
            "last_hour_usd": s.last_hour_usd,
            "projected_usd": s.projected_usd,
        }
        for s in statuses
    ]
    if format is Format.json:
        print_json(rows)
    elif format is Format.csv:
        print_csv(BUDGET_FIELDS, ([r[f] for f in BUDGET_FIELDS] for r in rows))
    else:
        table = Table(header_style="bold")
        for col in ("month", "team", "project", "budget $", "spent $", "used", "last hour $",
                    "month end at $"):  # fmt: skip
            table.add_column(
                col, justify="left" if col in ("month", "team", "project") else "right"
            )
        for r in rows:
            style = (
                "bold red" if r["used_pct"] >= 100 or r["projected_usd"] > r["budget_usd"] else None
            )
            table.add_row(
                r["month"], r["team"] or "(any)", r["project"] or "(any)",
                f"{r['budget_usd']:,.2f}", f"{r['month_to_date_usd']:,.2f}",
                f"{r['used_pct']:.0f}%", f"{r['last_hour_usd']:,.2f}",
                f"{r['projected_usd']:,.2f}", style=style,
            )  # fmt: skip
        console.print(table)
    when = iso_utc(as_of) if as_of else "no facts yet"
    err.print(f"{plural(len(rows), 'budget')} in force as of {when}")


BUDGET_FIELDS = [
    "month",
    "team",
    "project",
    "budget_usd",
    "month_to_date_usd",
    "used_pct",
    "last_hour_usd",
    "projected_usd",
]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `gpuledger` app."""
    app.command("alerts")(alerts_command)
    app.add_typer(budgets_app, name="budgets")
