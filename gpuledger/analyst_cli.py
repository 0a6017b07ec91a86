"""Analysts' commands: `export focus`, `recommend`, `report`, `mlflow sync`.

The logic lives in `gpuledger/analysts/`; this module parses options, connects to the store
and prints a one-line summary.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gpuledger.cli_context import command_group, settings_of
from gpuledger.output import money, plural, print_json

# No markup: labels, paths and hints (`gpuledger[mlflow]`) are printed as they are.
console = Console(markup=False, soft_wrap=True)
err = Console(stderr=True, markup=False, soft_wrap=True)

FromOpt = Annotated[
    str | None,
    typer.Option("--from", help="Window start: ISO date/time (UTC) or epoch seconds."),
]
ToOpt = Annotated[
    str | None,
    typer.Option(
        "--to",
        help="Window end (exclusive): ISO date/time (UTC) or epoch seconds. Default: now, "
        "which is the end of the newest cost fact in the store (never after the wall clock), "
        "so a replayed or backfilled period is found.",
    ),
]


def _window(start: str | None, end: str | None, period: str | None, now: Any = None) -> Any:
    from gpuledger.analysts.window import WindowError, resolve_window

    try:
        return resolve_window(start=start, end=end, period=period, now=now)
    except WindowError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _store(ctx: typer.Context) -> Any:
    from gpuledger.runtime import connect_store

    return connect_store(settings_of(ctx))


def _window_in_store(
    client: Any, start: str | None, end: str | None, period: str | None
) -> tuple[Any, str | None]:
    """The window, its default end taken by the one rule for "now" (the newest fact's end),
    and a note when it holds no fact, saying what the store holds."""
    from gpuledger.analysts.window import data_now, fact_span

    span = fact_span(client)
    window = _window(start, end, period, now=data_now(span))
    note = None
    if span is None:
        note = "No data in this period: the store holds no cost facts yet"
    elif span.end <= window.start or span.first >= window.end:
        note = f"No data in {window.label()}: {span.describe()}"
    if note:
        err.print(note)
    return window, note


def _store_and_window(
    ctx: typer.Context, start: str | None, end: str | None, period: str | None
) -> tuple[Any, Any, str | None]:
    """The store, the window (--from and --to together set aside --period's default) and the
    note on what it holds; a bad option is refused before connecting."""
    chosen_period = None if (start and end) else period
    _window(start, end, chosen_period)
    client = _store(ctx)
    window, note = _window_in_store(client, start, end, chosen_period)
    return client, window, note


def _basis(client: Any, window: Any, thresholds: Any = None) -> tuple[Any, str]:
    """What the window's recommendations are judged by, priced by the store's price book, and
    where that book came from."""
    from gpuledger.analysts.findings import DEFAULT_THRESHOLDS, Basis
    from gpuledger.analysts.prices import load_gpu_specs, load_prices
    from gpuledger.schema.pricebook import load_gpu_models

    source = load_prices(client)
    basis = Basis(
        prices=source.index(),
        specs=load_gpu_specs(),
        catalog=load_gpu_models(),
        window=window,
        thresholds=thresholds or DEFAULT_THRESHOLDS,
    )
    return basis, source.where


PERIOD_HELP = "s, min, h, d, w, mo (30 days); `m` is refused as ambiguous."


def _period_option(what: str) -> Any:
    """--period: what it is to this command, then the units every command takes."""
    return typer.Option(help=f"{what} Units: {PERIOD_HELP}")


@contextlib.contextmanager
def _output(out: Path, suffix: str) -> Iterator[Path]:
    """The file to write: `out` itself, or for `-` a scratch file copied to standard output."""
    if str(out) != "-":
        out.parent.mkdir(parents=True, exist_ok=True)
        yield out
        return
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"out{suffix}"
        yield path
        sys.stdout.flush()
        sys.stdout.buffer.write(path.read_bytes())
        sys.stdout.flush()


class ExportFormat(StrEnum):
    csv = "csv"
    parquet = "parquet"


class RecommendFormat(StrEnum):
    table = "table"
    json = "json"


export_app = command_group("Export cost data in standard formats.")


@export_app.command("focus")
def export_focus_command(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option("--out", help="File to write (.csv or .parquet); - for standard output."),
    ],
    start: FromOpt = None,
    end: ToOpt = None,
    period: Annotated[
        str | None, _period_option("Instead of --from: the window's length, e.g. 30d.")
    ] = None,
    format: Annotated[
        ExportFormat | None,
        typer.Option("--format", help="csv or parquet (default: from the file name)."),
    ] = None,
    billing_account: Annotated[
        str, typer.Option(help="FOCUS BillingAccountId of every row.")
    ] = "gpuledger",
    billing_account_name: Annotated[
        str, typer.Option(help="FOCUS BillingAccountName of every row.")
    ] = "gpuledger GPU fleet",
    legacy_columns: Annotated[
        bool,
        typer.Option(
            help="Also write the FOCUS 1.0-preview ids that focus-validator 1.0.0 checks "
            "(InvoiceIssuer, Provider, Publisher, ResourceID, ChargeType)."
        ),
    ] = True,
) -> None:
    """Write the cost facts of a window as FOCUS 1.0 charge rows (one per hour, GPU, job)."""
    from gpuledger.analysts.focus import BillingAccount, FocusFormat, export_focus, format_for
    from gpuledger.analysts.prices import load_prices
    from gpuledger.schema.pricebook import load_gpu_models

    _window(start, end, period)  # a bad option is refused before connecting
    try:
        asked = FocusFormat(format.value) if format else None
        chosen = format_for(out, asked) if str(out) != "-" else (asked or FocusFormat.csv)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    client = _store(ctx)
    window, _note = _window_in_store(client, start, end, period)
    source = load_prices(client)
    with _output(out, "." + chosen.value) as path:
        summary = export_focus(
            client,
            window,
            path,
            fmt=chosen,
            prices=source.index(),
            catalog=load_gpu_models(),
            account=BillingAccount(billing_account, billing_account_name),
            legacy_columns=legacy_columns,
        )
    (err if str(out) == "-" else console).print(
        f"wrote {summary.rows} FOCUS rows ({summary.gpu_hours:,.2f} GPU-hours, BilledCost "
        f"{money(summary.billed_cost)}, ListCost {money(summary.list_cost)}) for "
        f"{window.label()} to {out} ({summary.fmt.value}); list prices from "
        f"{source.where}"
    )


def recommend_command(
    ctx: typer.Context,
    period: Annotated[str | None, _period_option("The window to learn from, ending --to.")] = "30d",
    start: FromOpt = None,
    end: ToOpt = None,
    save: Annotated[
        bool,
        typer.Option(help="Store them in gpuledger.recommendations (view recommendations_latest)."),
    ] = False,
    format: Annotated[
        RecommendFormat, typer.Option("--format", "-f", help="Output: table or json.")
    ] = RecommendFormat.table,
    memory_headroom: Annotated[
        float, typer.Option(help="Peak memory x this must fit a smaller GPU.")
    ] = 1.2,
    compute_headroom: Annotated[
        float, typer.Option(help="p95 utilization x this must fit a smaller GPU's compute.")
    ] = 1.25,
    min_gpu_hours: Annotated[
        float, typer.Option(help="Jobs with less GPU time in the window are not judged.")
    ] = 1.0,
    oversized_memory_share: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Flag inference whose peak memory stayed under this share."
        ),
    ] = 0.2,
    oversized_min_days: Annotated[
        float, typer.Option(min=0.0, help="... for at least this many days of the window.")
    ] = 7.0,
    whole_node_gpus: Annotated[
        int,
        typer.Option(min=1, help="Flag notebooks holding at least this many GPUs (a whole node)."),
    ] = 8,
) -> None:
    """Recommendations with dollars: right-size, move to spot, reserve a baseline, scale idle
    inference endpoints to zero, and flag workloads that hold more GPU than they use
    (oversized: nothing is changed). Savings are the window's, scaled to 30 days."""
    from gpuledger.analysts.findings import Thresholds
    from gpuledger.analysts.recommend_store import compute_with_screening
    from gpuledger.analysts.recommend_store import save as save_recommendations

    client, window, _note = _store_and_window(ctx, start, end, period)
    thresholds = Thresholds(
        memory_headroom=memory_headroom,
        compute_headroom=compute_headroom,
        min_gpu_hours=min_gpu_hours,
        oversized_memory_share=oversized_memory_share,
        oversized_min_days=oversized_min_days,
        whole_node_gpus=whole_node_gpus,
    )
    basis, price_source = _basis(client, window, thresholds)
    found, screening = compute_with_screening(client, basis)
    if format is RecommendFormat.json:
        print_json(
            [
                {
                    "kind": r.kind.value,
                    "subject": r.subject,
                    "team": r.team,
                    "project": r.project,
                    "current": r.current,
                    "proposed": r.proposed,
                    "window_saving_usd": round(r.window_saving_usd, 6),
                    "monthly_saving_usd": round(r.monthly_saving_usd, 6),
                    "risk": r.risk,
                    "detail": r.detail,
                }
                for r in found
            ]
        )
    else:
        table = Table("kind", "subject", "now → proposed", "$/month", "risk", show_lines=True)
        for r in found:
            table.add_row(
                r.kind.value,
                r.subject + (f"\n{r.team}/{r.project}" if r.team else ""),
                f"{r.current}\n→ {r.proposed}",
                f"{r.monthly_saving_usd:,.2f}",
                r.risk,
            )
        console.print(table)
    if save:
        save_recommendations(client, found, window)
    largest = (
        f"; largest: {found[0].kind.value} {found[0].subject} {money(found[0].monthly_saving_usd)}"
        "/month"
        if found
        else ""
    )
    err.print(
        f"{plural(len(found), 'recommendation')} for {window.label()}{largest} "
        f"(savings overlap: do not add them up); prices from {price_source}"
        + ("; saved" if save else "")
    )
    if not found:
        err.print(f"nothing to recommend: {screening.describe()}")


def report_command(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", help="The HTML file to write; - for standard output.")
    ] = Path("report.html"),
    period: Annotated[str | None, _period_option("The period, ending --to: 7d, 24h, 2w.")] = "7d",
    start: FromOpt = None,
    end: ToOpt = None,
) -> None:
    """Write one self-contained HTML report (charts inline, no network): spend by team and
    project, idle waste, EffectiveCost, unit costs and recommendations."""
    from gpuledger.analysts.report import collect
    from gpuledger.analysts.report_html import render

    client, window, note = _store_and_window(ctx, start, end, period)
    basis, price_source = _basis(client, window)
    data = collect(client, basis, price_source=price_source)
    data.coverage_note = note
    with _output(out, ".html") as path:
        path.write_text(render(data), encoding="utf-8")
    (err if str(out) == "-" else console).print(
        f"wrote {out} for {window.label()}: spend {money(data.totals.cost_usd)}, idle cost "
        f"{money(data.totals.idle_cost_usd)}, {plural(len(data.recommendations), 'recommendation')}"
    )


mlflow_app = command_group(
    "Cost on MLflow runs (needs the extra: pip install 'gpuledger[mlflow]')."
)


@mlflow_app.command("sync")
def mlflow_sync_command(
    ctx: typer.Context,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            envvar="MLFLOW_TRACKING_URI",
            help="MLflow tracking URI, e.g. http://mlflow:5000 or sqlite:///path/mlflow.db "
            "(env MLFLOW_TRACKING_URI); required.",
        ),
    ] = None,
    job: Annotated[str, typer.Option(help="Only this job (e.g. from an epilog).")] = "",
    watch: Annotated[
        float | None,
        typer.Option(
            help="Keep syncing every this many seconds (a job's cost lands soon after it "
            "finishes; late corrections follow)."
        ),
    ] = None,
) -> None:
    """Log each finished job's GPU cost, GPU-hours, idle cost and mean utilization to the
    MLflow run named by its experiment_id (32 hex digits: an MLflow run id)."""
    from gpuledger.analysts import mlflow_sync

    try:
        mlflow_sync.require_mlflow()
    except mlflow_sync.MlflowMissing as exc:
        err.print(str(exc), style="red")
        raise typer.Exit(2) from exc
    if not tracking_uri:
        # MLflow's own default would be a new ./mlflow.db here: never the server meant.
        err.print(
            "mlflow sync: no tracking server named: set MLFLOW_TRACKING_URI (or "
            "--tracking-uri), e.g. http://mlflow:5000 or sqlite:///path/mlflow.db",
            style="red",
        )
        raise typer.Exit(2)
    tracker = mlflow_sync.tracking_client(tracking_uri)
    client = _store(ctx)

    def report(results: Any) -> None:
        results = list(results)
        outcomes = ("logged", "unchanged", "no_such_run")
        counts = {o: sum(1 for r in results if r.outcome == o) for o in outcomes}
        for r in results:
            if r.outcome == "no_such_run":
                err.print(
                    f"job {r.job_id}: experiment_id {r.run_id} is no run in the "
                    "tracking store; check MLFLOW_TRACKING_URI",
                    style="yellow",
                )
        console.print(
            f"MLflow sync: {counts['logged']} runs logged, {counts['unchanged']} unchanged, "
            f"{counts['no_such_run']} not found"
        )

    if watch:
        try:
            mlflow_sync.watch(client, tracker, watch, report)
        except KeyboardInterrupt:
            return
    else:
        report(mlflow_sync.sync(client, tracker, job))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `gpuledger` app."""
    app.add_typer(export_app, name="export")
    app.add_typer(mlflow_app, name="mlflow")
    app.command("recommend")(recommend_command)
    app.command("report")(report_command)
