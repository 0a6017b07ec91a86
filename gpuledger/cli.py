"""The `gpuledger` command line (ARCHITECTURE.md §7): one entry point, a sub-command per part.

Every setting is a `GPULEDGER_*` environment variable and a global flag given before the
sub-command, e.g. `gpuledger --store chdb:///tmp/ledger query "SELECT 1"`.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from gpuledger import examples
from gpuledger.output import plural
from gpuledger.settings import Settings

# Lines are never wrapped into several: a pipe or a log keeps each whole.
console = Console(soft_wrap=True)
# Errors are one line each, never wrapped into several (a pipe or a log keeps them whole).
err = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="gpuledger",
    help=(
        "GPU telemetry turned into per-second cost facts.\n\n"
        "Start here: `gpuledger up` runs everything embedded (broker, ClickHouse store, "
        "worker, a simulated fleet) with a live board. Then, from another terminal: "
        '`gpuledger query "SELECT team, round(sum(cost_usd * sign), 4) AS usd '
        'FROM gpuledger.cost_facts GROUP BY team"`.'
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
)
db_app = typer.Typer(help="The ClickHouse schema.", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Publish job events from a scheduler's script (prolog/epilog, CI job).",
    no_args_is_help=True,
)
prices_app = typer.Typer(help="The price book on the prices topic.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.add_typer(prices_app, name="prices")


def settings_of(ctx: typer.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


def _print_version(value: bool) -> None:
    if value:
        from gpuledger import __version__

        print(f"gpuledger {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    bootstrap: Annotated[
        str | None,
        typer.Option(
            help="Kafka bootstrap servers (env GPULEDGER_BOOTSTRAP). "
            "Unset: the embedded broker that `gpuledger up`/`broker` runs."
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="chdb:///PATH (embedded store) or clickhouse://user:password@host:8123/gpuledger "
            "(env GPULEDGER_STORE). Unset: chdb under the data folder."
        ),
    ] = None,
    topic_prefix: Annotated[
        str | None, typer.Option(help="Topic name prefix (env GPULEDGER_TOPIC_PREFIX).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Local state folder (env GPULEDGER_DATA_DIR)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any other setting as NAME=VALUE, e.g. --set idle_alert_after_s=120 "
            "(repeatable; env GPULEDGER_NAME). `gpuledger settings` lists them all.",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print gpuledger's version and exit.",
            is_eager=True,
            callback=_print_version,
        ),
    ] = False,
) -> None:
    overrides: dict[str, Any] = {}
    for item in set_ or []:
        name, sep, value = item.partition("=")
        name = name.strip().lower().removeprefix("gpuledger_")
        if not sep or name not in Settings.model_fields:
            err.print(
                f"--set {item!r}: expected NAME=VALUE with NAME one of "
                f"{', '.join(Settings.model_fields)}",
                style="red",
                markup=False,
            )
            raise typer.Exit(2)
        overrides[name] = value
    overrides |= {
        k: v
        for k, v in {
            "bootstrap": bootstrap,
            "store": store,
            "topic_prefix": topic_prefix,
            "data_dir": data_dir,
        }.items()
        if v is not None
    }
    try:
        ctx.obj = Settings(**overrides)
    except ValidationError as exc:
        for problem in exc.errors(include_url=False):
            name = ".".join(str(p) for p in problem["loc"])
            err.print(
                f"bad setting {name} (GPULEDGER_{name.upper()} or --set {name}=...): "
                f"{problem['msg']} (got {problem.get('input')!r})",
                style="red",
                markup=False,
            )
        raise typer.Exit(2) from exc


@app.command("settings")
def show_settings(ctx: typer.Context) -> None:
    """List every setting: its environment variable, value in force and meaning."""
    from gpuledger.store import redact_store_url

    settings = settings_of(ctx)
    rows = []
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        shown = "(unset)" if value is None else str(value)
        if name == "store" and value:
            shown = redact_store_url(shown)
        rows.append((name, f"GPULEDGER_{name.upper()}", shown, field.description or ""))
    if console.is_terminal and console.width >= 140:
        table = Table("setting", "environment variable", "value", "meaning")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    # Narrow or piped: one block per setting, nothing cut.
    import textwrap

    for name, variable, shown, meaning in rows:
        print(f"{name} = {shown}\n    {variable}, --set {name}=...")
        print(textwrap.fill(meaning, width=80, initial_indent="    ", subsequent_indent="    "))


# -- the parts -------------------------------------------------------------------------
@app.command()
def up(
    ctx: typer.Context,
    scenario: Annotated[
        Path | None,
        typer.Option(help="Fleet scenario for the simulated agent (default: the demo fleet)."),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")
    ] = None,
    board: Annotated[bool, typer.Option(help="Show the live board.")] = True,
) -> None:
    """Run everything embedded: broker, ClickHouse store, worker, simulated fleet, live board.

    Ctrl-C stops every part in order (the agent, then the worker, which stores what it holds,
    then the store and the broker) and leaves no process behind.
    """
    from gpuledger.up import run_up

    raise typer.Exit(run_up(settings_of(ctx), scenario=scenario, duration=duration, board=board))


@app.command()
def worker(ctx: typer.Context) -> None:
    """Run a stream worker: samples x jobs x prices -> cost facts in ClickHouse.

    Run several with the same group to share the samples' partitions. SIGTERM stores what
    the worker holds before it exits.
    """
    from gpuledger.runtime import run_worker

    raise typer.Exit(run_worker(settings_of(ctx)))


@app.command()
def agent(
    ctx: typer.Context,
    simulate: Annotated[
        Path | None,
        typer.Option(
            help="Fleet scenario file: simulate its GPUs instead of reading NVML "
            "(e.g. agents/scenarios/demo.toml)."
        ),
    ] = None,
    node: Annotated[
        list[str] | None, typer.Option(help="With --simulate: only these nodes (repeatable).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Sampling interval in seconds.")] = 1.0,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    speed: Annotated[
        float, typer.Option(help="With --simulate: scenario seconds per wall second.")
    ] = 1.0,
    node_name: Annotated[
        str | None,
        typer.Option(
            envvar="GPULEDGER_NODE_NAME",
            help="This node's name in samples and metrics (default: the hostname; in a "
            "DaemonSet, the Kubernetes node name).",
        ),
    ] = None,
    proc_root: Annotated[
        Path,
        typer.Option(
            envvar="GPULEDGER_PROC_ROOT",
            help="The host's /proc, where GPU processes are attributed (a DaemonSet mounts "
            "the host's /proc, e.g. at /host/proc).",
        ),
    ] = Path("/proc"),
    spool_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="GPULEDGER_SPOOL_DIR",
            help="Where samples wait while Kafka is unreachable; kept across restarts "
            "(default: DATA_DIR/agent-spool/NODE).",
        ),
    ] = None,
    spool_max_mb: Annotated[
        float,
        typer.Option(
            envvar="GPULEDGER_SPOOL_MAX_MB",
            help="Spool size limit in MB: beyond it the oldest samples are dropped and counted.",
        ),
    ] = 256.0,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="GPULEDGER_METRICS_PORT",
            help="Serve Prometheus /metrics (dcgm-exporter names) on this port, e.g. 9400.",
        ),
    ] = None,
    metrics_addr: Annotated[
        str, typer.Option(envvar="GPULEDGER_METRICS_ADDR", help="Address /metrics listens on.")
    ] = "0.0.0.0",
    kubelet_url: Annotated[
        str | None,
        typer.Option(
            envvar="GPULEDGER_KUBELET_URL",
            help="The kubelet's pod list, e.g. https://$NODE_IP:10250/pods: names pods in "
            "metrics and takes job labels (gpuledger.io/job-id, ...) from pod labels.",
        ),
    ] = None,
    kubelet_insecure_tls: Annotated[
        bool,
        typer.Option(
            envvar="GPULEDGER_KUBELET_INSECURE_TLS",
            help="Do not verify the kubelet's (often self-signed) serving certificate.",
        ),
    ] = False,
) -> None:
    """Run the node agent: read NVML every interval and publish one batch per node."""
    from gpuledger.runtime import run_agent_command

    raise typer.Exit(
        run_agent_command(
            settings_of(ctx),
            simulate=simulate,
            nodes=node or None,
            interval_s=interval,
            duration_s=duration,
            speed=speed,
            node_name=node_name,
            proc_root=proc_root,
            spool_dir=spool_dir,
            spool_max_mb=spool_max_mb,
            metrics_port=metrics_port,
            metrics_addr=metrics_addr,
            kubelet_url=kubelet_url,
            kubelet_insecure_tls=kubelet_insecure_tls,
        )
    )


@app.command()
def broker(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 = a free one).")] = 0,
    partitions: Annotated[int, typer.Option(help="Partitions of each topic.")] = 1,
) -> None:
    """Run the embedded Kafka-protocol broker (memory only) and create gpuledger's topics."""
    from gpuledger.runtime import run_broker

    raise typer.Exit(run_broker(settings_of(ctx), port=port, partitions=partitions))


@app.command()
def store(
    ctx: typer.Context,
    path: Annotated[
        Path | None, typer.Argument(help="The chdb folder (default: under the data folder).")
    ] = None,
    port: Annotated[int, typer.Option(help="TCP port (0 = a free one).")] = 0,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on; anything but loopback needs GPULEDGER_STORE_PASSWORD."
        ),
    ] = "127.0.0.1",
) -> None:
    """Serve a chdb folder over ClickHouse's HTTP interface (the embedded store).

    Processes given `GPULEDGER_STORE=chdb:///PATH` find it through PATH/store.json and its
    password in PATH/store.secret (readable by this user only).
    """
    from gpuledger.store import serve

    settings = settings_of(ctx)
    folder = path or Path(settings.store_url().removeprefix("chdb://"))
    folder.mkdir(parents=True, exist_ok=True)
    err.print(f"store: serving {folder} (Ctrl-C to stop)")
    serve(folder, port=port, host=host)


@db_app.command("migrate")
def db_migrate(ctx: typer.Context) -> None:
    """Apply the schema migrations not yet applied (safe to run again)."""
    from gpuledger.runtime import connect_store
    from gpuledger.schema.migrate import migrate

    client = connect_store(settings_of(ctx))
    applied = migrate(client)
    if applied:
        console.print(f"applied {plural(len(applied), 'migration')}: {', '.join(applied)}")
    else:
        console.print("schema up to date: nothing to apply")


# -- job events ------------------------------------------------------------------------
class FinalState(StrEnum):
    succeeded = "succeeded"
    failed = "failed"
    preempted = "preempted"
    cancelled = "cancelled"


class JobTypeOpt(StrEnum):
    training = "training"
    inference = "inference"
    tuning = "tuning"
    data_processing = "data_processing"
    notebook = "notebook"
    other = "other"


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
        JobTypeOpt | None, typer.Option(help="What the job does (decides its views).")
    ] = None,
    experiment_id: Annotated[
        str | None, typer.Option(help="Experiment or MLflow run the job belongs to.")
    ] = None,
    label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE label (repeatable).")] = None,
    at: Annotated[
        str | None, typer.Option(help="Start time: epoch seconds or ISO 8601 (default now).")
    ] = None,
) -> None:
    """Publish that a job started on some GPUs."""
    from gpuledger.schema.messages import JobEvent, JobState, JobType

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
        job_type=JobType(job_type.value) if job_type else None,
        experiment_id=experiment_id,
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


# -- replay and query ------------------------------------------------------------------
@app.command()
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


@app.command()
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
    from gpuledger.output import print_csv, print_json, text_value
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
    names = list(result.column_names)
    rows = result.result_rows
    if format is OutputFormat.json:
        print_json([dict(zip(names, r, strict=True)) for r in rows])
    elif format is OutputFormat.csv:
        print_csv(names, rows)
    else:
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


def _register_command_groups() -> None:
    # Commands that belong to other parts register themselves, each in its own module.
    from gpuledger import alerts_cli, analyst_cli, grafana_cli

    for module in (alerts_cli, analyst_cli, grafana_cli):
        module.register(app)


_register_command_groups()
examples.attach(app)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    import logging

    from gpuledger.errors import explain

    # The client logs each failed request before raising it; the user gets our one line.
    logging.getLogger("clickhouse_connect").addHandler(logging.NullHandler())

    try:
        app()
    except Exception as exc:
        # No traceback reaches a user: one line that says what failed and what fixes it.
        failure = explain(exc)
        if os.environ.get("GPULEDGER_DEBUG"):
            import traceback

            traceback.print_exc()
        if failure is None:
            err.print(
                f"gpuledger: unexpected {type(exc).__name__}: {exc} "
                "(a bug: GPULEDGER_DEBUG=1 shows where; please report it)",
                style="red",
                markup=False,
            )
            sys.exit(1)
        err.print(f"gpuledger: {failure.message}", style="red", markup=False)
        sys.exit(failure.exit_code)


if __name__ == "__main__":
    main()
