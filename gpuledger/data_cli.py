"""The commands that move data in and out: `replay` and `query`, and the `db`, `jobs`,
`prices` and `value` groups (migrations, job events from a scheduler's scripts, the price
book, what inference endpoints' requests are worth)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gpuledger.cli_context import command_group, console, err, settings_of
from gpuledger.output import plural
from gpuledger.schema.messages import JobType
from gpuledger.settings import Settings

db_app = command_group("The ClickHouse schema.")


@db_app.command("migrate")
def db_migrate(
    ctx: typer.Context,
    cluster: Annotated[
        str | None,
        typer.Option(
            help="Create the schema on this ClickHouse cluster (a name from the servers' "
            "remote_servers; needs Keeper): sharded, replicated tables with Distributed ones "
            "over them, every statement ON CLUSTER. Default: the store_cluster setting."
        ),
    ] = None,
    print_sql: Annotated[
        bool,
        typer.Option(
            "--print",
            help="Print every statement, as migrate would run it on an empty database, and "
            "connect to nothing.",
        ),
    ] = False,
) -> None:
    """Apply the schema migrations not yet applied (safe to run again)."""
    from gpuledger.runtime import connect_store
    from gpuledger.schema.cluster import ClusterError, check_cluster_name
    from gpuledger.schema.migrate import migrate, script

    settings = settings_of(ctx)
    cluster = cluster or settings.store_cluster
    if cluster is not None:
        try:
            check_cluster_name(cluster)
        except ClusterError as exc:
            raise typer.BadParameter(str(exc), param_hint="--cluster") from exc
    if print_sql:
        sys.stdout.write(script(cluster=cluster))
        return
    client = connect_store(settings)
    applied = migrate(client, cluster=cluster)
    if applied:
        console.print(f"applied {plural(len(applied), 'migration')}: {', '.join(applied)}")
    else:
        console.print("schema up to date: nothing to apply")


# -- job events ------------------------------------------------------------------------
jobs_app = command_group("Publish job events from a scheduler's script (prolog/epilog, CI job).")


class FinalState(StrEnum):
    succeeded = "succeeded"
    failed = "failed"
    preempted = "preempted"
    cancelled = "cancelled"


def _when(value: str | None) -> float:
    """Epoch seconds, or an ISO 8601 time, or now."""
    if value is None:
        return time.time()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{value!r} is neither epoch seconds nor an ISO 8601 time (2026-11-25T10:00:00Z)"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@jobs_app.command("start")
def jobs_start(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The scheduler's job id.")],
    gpu: Annotated[
        list[str] | None, typer.Option(help="GPU UUID allocated to the job (repeatable).")
    ] = None,
    team: Annotated[str | None, typer.Option(help="Team charged for the job.")] = None,
    project: Annotated[str | None, typer.Option(help="Project charged for the job.")] = None,
    job_type: Annotated[
        JobType | None, typer.Option(help="What the job does (decides its views).")
    ] = None,
    experiment_id: Annotated[
        str | None, typer.Option(help="Experiment or MLflow run the job belongs to.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model the job trains or serves, e.g. llama-3-70b.")
    ] = None,
    environment: Annotated[
        str | None, typer.Option(help="Where it runs: prod, staging, dev, ...")
    ] = None,
    label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE label (repeatable).")] = None,
    at: Annotated[
        str | None, typer.Option(help="Start time: epoch seconds or ISO 8601 (default now).")
    ] = None,
) -> None:
    """Publish that a job started on some GPUs."""
    from gpuledger.schema.messages import JobEvent, JobState

    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    started = _when(at)
    event = JobEvent(
        ts=time.time(),
        job_id=job_id,
        state=JobState.running,
        team=team,
        project=project,
        job_type=job_type,
        experiment_id=experiment_id,
        model=model,
        environment=environment,
        gpu_uuids=gpu or None,
        started_at=started,
        labels=labels or None,
    )
    if not gpu:
        err.print(
            f"note: job {job_id} names no --gpu: it is charged only for GPUs whose processes "
            f"carry its id (GPULEDGER_JOB_ID={job_id}, SLURM_JOB_ID, or the pod label "
            "gpuledger.io/job-id)",
            style="yellow",
            markup=False,
        )
    _publish_one(settings_of(ctx), "jobs", job_id, event)
    console.print(f"job {job_id} started on {plural(len(gpu or []), 'GPU')}")


@jobs_app.command("finish")
def jobs_finish(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The scheduler's job id.")],
    state: Annotated[FinalState, typer.Option(help="How the job ended.")] = FinalState.succeeded,
    at: Annotated[
        str | None, typer.Option(help="End time: epoch seconds or ISO 8601 (default now).")
    ] = None,
) -> None:
    """Publish that a job ended (its GPUs are no longer allocated to it)."""
    from gpuledger.schema.messages import JobEvent, JobState

    event = JobEvent(ts=time.time(), job_id=job_id, state=JobState(state.value), ended_at=_when(at))
    settings = settings_of(ctx)
    if _job_unknown_to_the_store(settings, job_id):
        err.print(
            f"note: the store knows no job {job_id} yet: the finish is kept and applies when "
            "its start (or its processes' samples) arrive",
            style="yellow",
            markup=False,
        )
    _publish_one(settings, "jobs", job_id, event)
    console.print(f"job {job_id} {state.value}")


def _job_unknown_to_the_store(settings: Settings, job_id: str) -> bool:
    """True when a running store says it has no such job; False when it has one or cannot
    be asked (a publishing command never waits on, or starts, a store)."""
    from gpuledger.store import connect

    try:
        client = connect(
            settings.store_url(), start=False, connect_timeout=2, send_receive_timeout=5
        )
        found = client.query(
            "SELECT count() FROM gpuledger.jobs WHERE job_id = {j:String}", parameters={"j": job_id}
        ).result_rows[0][0]
        client.close()
    except Exception:
        return False
    return found == 0


def _publish_one(settings: Settings, topic: str, key: str, message: Any) -> None:
    from gpuledger.runtime import Publisher

    with Publisher(settings) as pub:
        pub.send(topic, key, message.model_dump_json().encode())


# -- prices ----------------------------------------------------------------------------
prices_app = command_group("The price book on the prices topic.")


@prices_app.command("load")
def prices_load(
    ctx: typer.Context,
    file: Annotated[
        Path | None,
        typer.Argument(
            help="Price book: CSV (provider,region,gpu_model,pricing_model,usd_per_gpu_hour,"
            "effective_from,source,read_on) or JSON lines of PriceEntry. "
            "Default: the packaged list prices."
        ),
    ] = None,
) -> None:
    """Publish a price book to the prices topic (the only way prices reach the worker)."""
    from gpuledger.runtime import publish_price_book
    from gpuledger.schema.pricebook import PriceBookError

    try:
        entries = publish_price_book(settings_of(ctx), file)
    except (PriceBookError, FileNotFoundError, ValueError) as exc:
        err.print(str(exc), style="red", markup=False)
        raise typer.Exit(2) from exc
    models = len({e.gpu_model for e in entries})
    providers = len({e.provider for e in entries})
    console.print(
        f"published {len(entries)} prices ({models} GPU models, {providers} providers) "
        f"from {file or 'the default price book'}"
    )


# -- endpoint values ---------------------------------------------------------------------
value_app = command_group(
    "What 1,000 requests to each inference endpoint are worth (endpoint margins)."
)


@value_app.command("load")
def value_load(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with the header endpoint,usd_per_1k_requests[,effective_from][,note]: "
            "the endpoint is the inference job's id; effective_from epoch seconds or an ISO "
            "date (UTC), empty = always.",
            exists=True,
            dir_okay=False,
        ),
    ],
) -> None:
    """Load what 1,000 requests to each endpoint are worth into the store: the view
    endpoint_margin_daily(start, end) sets them against the endpoint's GPU cost, and a guard
    policy with condition = "losing_money" acts on endpoints whose requests cost more than
    they bring.
    """
    from gpuledger.runtime import connect_store
    from gpuledger.schema.pricebook import PriceBookError, load_endpoint_values

    try:
        values = load_endpoint_values(file)
    except PriceBookError as exc:
        err.print(str(exc), style="red", markup=False)
        raise typer.Exit(2) from exc
    client = connect_store(settings_of(ctx))
    now = datetime.now(UTC)
    client.insert(
        "gpuledger.endpoint_value",
        [
            [
                v.endpoint,
                datetime.fromtimestamp(v.effective_from, UTC),
                v.usd_per_1k_requests,
                v.note,
                file.name,
                now,
            ]
            for v in values
        ],
        column_names=[
            "endpoint",
            "effective_from",
            "usd_per_1k_requests",
            "note",
            "source",
            "loaded_at",
        ],
    )
    endpoints = len({v.endpoint for v in values})
    console.print(
        f"loaded {plural(len(values), 'value')} for {plural(endpoints, 'endpoint')} from {file}"
    )


# -- replay and query ------------------------------------------------------------------
def replay(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(help='JSON lines of {"topic", "key", "value"}; - for standard input.'),
    ],
    skip_bad: Annotated[
        bool,
        typer.Option("--skip-bad", help="Publish the good lines even when some are bad."),
    ] = False,
) -> None:
    """Publish a JSON-lines file of records, for backfills and demos.

    The whole file is checked before anything is sent: with a bad line nothing is published
    (unless --skip-bad), and the bad lines are named. `topic` with or without the prefix
    ("samples" or "gpuledger.samples"); an object `value` is sent as JSON, a string `value`
    as its bytes unchanged (so malformed input can be replayed too: the worker dead-letters
    it).
    """
    from gpuledger.errors import EXIT_USAGE
    from gpuledger.replay import ReplaySource
    from gpuledger.runtime import replay_file
    from gpuledger.schema.topics import Topics

    settings = settings_of(ctx)
    if str(file) != "-" and not file.exists():
        err.print(f"replay: {file}: no such file", style="red", markup=False)
        raise typer.Exit(EXIT_USAGE)
    source = ReplaySource(file, Topics(settings.topic_prefix))
    checked = source.check()
    if checked.problems and not skip_bad:
        err.print(
            checked.describe(source.name)
            + f"; nothing published (fix them, or --skip-bad to send the {checked.good} good)",
            style="red",
            markup=False,
        )
        raise typer.Exit(EXIT_USAGE)
    if checked.problems:
        err.print(checked.describe(source.name) + ": skipped", style="yellow", markup=False)
    sent = replay_file(settings, source, checked.good, console=err)
    console.print(
        f"replayed {plural(sent, 'record')} from {source.name}"
        + (f"; skipped {plural(len(checked.problems), 'bad line')}" if checked.problems else "")
    )


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def query(
    ctx: typer.Context,
    sql: Annotated[
        str | None,
        typer.Argument(
            help="The SQL (tables live in database `gpuledger`); `-` reads it from standard input."
        ),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="Read the SQL from this file.", dir_okay=False)
    ] = None,
    format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="table (default), json or csv.")
    ] = OutputFormat.table,
    param: Annotated[
        list[str] | None,
        typer.Option(help="NAME=VALUE for a {NAME:Type} placeholder in the SQL (repeatable)."),
    ] = None,
    write: Annotated[
        bool,
        typer.Option("--write", help="Allow statements that change the store (off: read-only)."),
    ] = False,
) -> None:
    """Run SQL against the store and print the rows (table, json or csv).

    Read-only unless `--write` is given: a DROP, INSERT or ALTER is refused by the store.
    JSON is strict (NaN and infinities are null, times are UTC with `Z`).

    Example: `gpuledger query -f json "SELECT team, sum(cost_usd * sign) AS usd FROM
    gpuledger.cost_facts GROUP BY team"`, or `gpuledger query --file q.sql`.
    """
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from gpuledger.errors import (
        EXIT_FAILED,
        EXIT_USAGE,
        UNKNOWN_DATABASE,
        store_code,
        store_message,
    )
    from gpuledger.runtime import connect_store

    text = _query_text(sql, file)
    if text is None:
        err.print("query: give the SQL as an argument, `-` for standard input, or --file FILE")
        raise typer.Exit(EXIT_USAGE)
    params: dict[str, str] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--param {item!r}: expected NAME=VALUE")
        params[key] = value
    client = connect_store(settings_of(ctx))
    try:
        result = client.query(
            text, parameters=params or None, settings=None if write else {"readonly": 2}
        )
    except ClickHouseError as exc:
        if store_code(exc) == UNKNOWN_DATABASE:
            raise  # a store never migrated: the one line says how to set it up
        reason = store_message(exc)
        if "in readonly mode" in reason:
            reason += " (query is read-only; add --write to change the store)"
        err.print(f"query failed: {reason}", style="red", markup=False)
        raise typer.Exit(EXIT_FAILED) from exc
    _print_rows(list(result.column_names), result.result_rows, format)


def _print_rows(names: list[str], rows: Sequence[Sequence[Any]], format: OutputFormat) -> None:
    from gpuledger.output import print_csv, print_json, text_value

    if format is OutputFormat.json:
        print_json([dict(zip(names, r, strict=True)) for r in rows])
        return
    if format is OutputFormat.csv:
        print_csv(names, rows)
        return
    table = Table(show_lines=False)
    for i, name in enumerate(names):
        numeric = any(
            isinstance(r[i], int | float | Decimal) and not isinstance(r[i], bool)
            for r in rows[:100]
        )
        # Fold long values instead of cutting them: ids and times stay whole.
        table.add_column(name, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(text_value(v, null="NULL") for v in row))
    # Piped output is not cut to 80 columns: rows stay readable in a file or a pager.
    out = console if console.is_terminal else Console(width=max(160, 14 * len(names)))
    out.print(table)
    err.print(plural(len(rows), "row"))


def _query_text(sql: str | None, file: Path | None) -> str | None:
    if file is not None:
        if sql is not None:
            raise typer.BadParameter("give the SQL or --file, not both")
        try:
            return file.read_text()
        except OSError as exc:
            raise typer.BadParameter(f"--file {file}: {exc.strerror}") from exc
    if sql == "-":
        return sys.stdin.read()
    return sql


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `gpuledger` app (in the order `--help` lists them)."""
    app.command()(replay)
    app.command()(query)
    app.add_typer(db_app, name="db")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(prices_app, name="prices")
    app.add_typer(value_app, name="value")
