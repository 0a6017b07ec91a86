"""The `gpuledger` command line (ARCHITECTURE.md §7): one entry point, a sub-command per part.

Every setting is a `GPULEDGER_*` environment variable and a global flag given before the
sub-command, e.g. `gpuledger --store chdb:///tmp/ledger query "SELECT 1"`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table

from gpuledger import examples
from gpuledger.cli_context import console, err, settings_of
from gpuledger.settings import Settings

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


def _agent_option(option: dataclasses.Field[Any]) -> inspect.Parameter:
    """One of `AgentConfig`'s options as a typer parameter named like its flag."""
    from gpuledger.agents.config import flag_of

    meta = option.metadata
    kind, default, help_text = meta["kind"], option.default, meta["help"]
    if meta["repeat"]:
        kind, default = list[kind], None  # type: ignore[valid-type]
    if meta["setting"] is not None:
        env = f"GPULEDGER_{meta['setting'].upper()}"
        help_text += f" Default: the {meta['setting']} setting ({env}, else {default})."
        default = None
    if default is None:
        kind = kind | None
    name = flag_of(option).removeprefix("--").replace("-", "_")
    info = typer.Option(help=help_text, envvar=meta["env"], show_default=default is not None)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info]
    )


def _agent_parameters() -> tuple[inspect.Signature, dict[str, str]]:
    """`gpuledger agent`'s signature, and each parameter's `AgentConfig` field."""
    from gpuledger.agents.config import options

    cli_options = [o for o in options() if not o.metadata["global_option"]]
    parameters = [_agent_option(o) for o in cli_options]
    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    fields = {p.name: o.name for p, o in zip(parameters, cli_options, strict=True)}
    return inspect.Signature([context, *parameters], return_annotation=None), fields


def agent(ctx: typer.Context, **values: Any) -> None:
    """Run the node agent: read NVML every interval and publish one batch per node."""
    from gpuledger.runtime import run_agent_command

    options = {AGENT_FIELDS[name]: value for name, value in values.items()}
    options["nodes"] = tuple(options["nodes"] or ())
    raise typer.Exit(run_agent_command(settings_of(ctx), options))


# The options are `AgentConfig`'s (agents/config.py), which the agent process parses too.
_AGENT_SIGNATURE, AGENT_FIELDS = _agent_parameters()
agent.__signature__ = _AGENT_SIGNATURE  # type: ignore[attr-defined]
agent.__annotations__ = {p.name: p.annotation for p in _AGENT_SIGNATURE.parameters.values()}
app.command()(agent)


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


def _register_command_groups() -> None:
    # Commands that belong to other parts register themselves, each in its own module.
    from gpuledger import alerts_cli, analyst_cli, data_cli, grafana_cli, guard_cli

    for module in (data_cli, alerts_cli, analyst_cli, grafana_cli, guard_cli):
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
