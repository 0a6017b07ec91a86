"""`gpuledger guard`, `gpuledger actions` and `gpuledger policies`: guardrails that act on idle
GPUs (what the owner is told, then what is done, and when), and their audit trail."""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuledger.cli_context import (
    Format,
    FormatOpt,
    LimitOpt,
    command_group,
    console,
    err,
    settings_of,
)
from gpuledger.output import money, plural, print_csv, print_json, text_value

if TYPE_CHECKING:
    from gpuledger.ledger.guard import Policy
    from gpuledger.settings import Settings

policies_app = command_group(
    "Guardrail policies: notify, announce, then act on idle GPUs (dry run by default)."
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
    policies = _load(file)
    for policy in policies:
        scope = {**policy.match, **{f"label {k}": v for k, v in policy.match_labels.items()}}
        if policy.condition != "idle":
            scope["condition"] = policy.condition
        if policy.budget_rules:
            scope["budget"] = "|".join(sorted(policy.budget_rules)) + " firing"
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


def _load(file: Path) -> list[Policy]:
    from gpuledger.errors import EXIT_USAGE
    from gpuledger.ledger.guard import PolicyError, parse_policies

    try:
        return parse_policies(file.read_text(), str(file))
    except PolicyError as exc:
        for line in str(exc).splitlines():
            err.print(line, style="red", markup=False)
        raise typer.Exit(EXIT_USAGE) from exc


def guard_command(
    ctx: typer.Context,
    policies_file: Annotated[
        Path | None,
        typer.Option(
            "--policies",
            help="The policies file (default: the guard_policies setting).",
            dir_okay=False,
        ),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="One round, then exit.")] = False,
) -> None:
    """Run the guard: every guard_check_s, match the idle GPUs firing now against the
    policies, carry out the steps that fall due (dry runs unless a policy enforces), and
    record each in the guard_actions table (and on the actions topic).

    The guard holds the cluster access the worker never has: Slurm's scontrol and scancel on
    PATH, Kubernetes from the pod's service account or the kubeconfig. With
    GPULEDGER_ALERTMANAGER_URL set, every step is also an Alertmanager alert GpuGuardrailStep
    (labels policy, step, action, dry_run, team, project, job_id, gpu_uuid, node).
    GPULEDGER_GUARD_KILL_SWITCH=1 turns every act step into a dry run.
    """
    from gpuledger.errors import EXIT_USAGE
    from gpuledger.guard.service import Guard
    from gpuledger.runtime import connect_store

    settings = settings_of(ctx)
    file = policies_file or settings.guard_policies
    if file is None:
        err.print("guard: no policies: --policies FILE or GPULEDGER_GUARD_POLICIES")
        raise typer.Exit(EXIT_USAGE)
    policies = _load(file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its connection chatter is no news
    guard = Guard(
        connect_store(settings),
        policies,
        _actuators(policies, settings.alertmanager_url),
        kill_switch=settings.guard_kill_switch,
        publish=_publisher(settings),
    )
    enforced = [p.name for p in policies if p.enforce]
    err.print(
        f"guard: {plural(len(policies), 'policy', 'policies')} from {file}; "
        + (f"enforced: {', '.join(enforced)}" if enforced else "all dry runs")
        + ("; KILL SWITCH ON: nothing is carried out" if settings.guard_kill_switch else "")
    )
    if once:
        rows = guard.check_once()
        console.print(f"{plural(len(rows), 'step')} decided")
        return
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops the guard between rounds
        guard.run(settings.guard_check_s, lambda: stopping["now"])


def _actuators(policies: list[Policy], alertmanager_url: str | None) -> Any:
    import shutil

    from gpuledger.guard.actuators import (
        Actuators,
        AlertmanagerNotices,
        ExecHook,
        Kubernetes,
        Slurm,
        Webhook,
    )
    from gpuledger.ledger.guard import NEEDS

    # Only enforced steps reach a scheduler: dry runs need no cluster access.
    needed = {NEEDS.get(s.action) for p in policies if p.enforce for s in p.steps if s.action}
    kubernetes = None
    if "kubernetes" in needed:
        try:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            kubernetes = Kubernetes(client.ApiClient())
        except Exception as exc:  # no cluster here: its enforced steps fail, and say so
            err.print(f"guard: no Kubernetes access ({exc}); enforced Kubernetes steps will fail")
    slurm = None
    if "slurm" in needed:
        if shutil.which("scontrol") and shutil.which("scancel"):
            slurm = Slurm()
        else:
            err.print("guard: scontrol or scancel is not on PATH; enforced Slurm steps will fail")
    hooks = {p.name: Webhook(p.webhook_url) for p in policies if p.webhook_url}
    commands = {p.name: ExecHook(p.exec_command) for p in policies if p.exec_command}
    return Actuators(
        slurm=slurm,
        kubernetes=kubernetes,
        webhooks=hooks,
        exec_hooks=commands,
        alertmanager=AlertmanagerNotices(alertmanager_url) if alertmanager_url else None,
    )


def _publisher(settings: Settings) -> Any:
    """Rows to the actions topic, when a broker is configured (the store keeps them anyway)."""
    if not settings.bootstrap:
        return None
    import orjson
    from kafka import KafkaProducer

    from gpuledger.schema.topics import Topics

    topic = Topics(settings.topic_prefix).actions
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")

    def publish(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            key = f"{row['policy']}/{row['target']}".encode()
            producer.send(topic, key=key, value=orjson.dumps(row))
        producer.flush(timeout=30)

    return publish


ACTIONS_SQL = """
SELECT decided_at, policy, target, step, kind,
       action, dry_run, job_id, team, usd_at_stake, outcome, reason
FROM gpuledger.guard_actions
WHERE decided_at >= fromUnixTimestamp64Milli({since:Int64})
  AND ({policy:String} = '' OR policy = {policy:String})
ORDER BY decided_at DESC, policy, target, step
LIMIT {limit:UInt32}
"""


def actions_command(
    ctx: typer.Context,
    since: Annotated[
        str | None,
        typer.Option(help="Only decisions this recent: 30min, 2h, 7d, epoch seconds or ISO 8601."),
    ] = None,
    policy: Annotated[str | None, typer.Option(help="Only this policy's decisions.")] = None,
    limit: LimitOpt = 100,
    format: FormatOpt = Format.table,
) -> None:
    """The guard's audit trail: each step it decided (notices, announcements, actions and dry
    runs), its outcome and the dollars at stake, newest first."""
    import time

    from rich.table import Table

    from gpuledger.alerts_cli import parse_since
    from gpuledger.runtime import connect_store

    start = parse_since(since, time.time()) if since else 0.0
    client = connect_store(settings_of(ctx))
    result = client.query(
        ACTIONS_SQL,
        parameters={"since": round(start * 1000), "policy": policy or "", "limit": limit},
    )
    names = list(result.column_names)
    found = [dict(zip(names, row, strict=True)) for row in result.result_rows]
    if format is Format.json:
        print_json(found)
    elif format is Format.csv:
        print_csv(names, result.result_rows)
    else:
        table = Table()
        for name in ("decided_at", "policy", "target", "kind", "action", "dry_run", "outcome"):
            table.add_column(name)
        table.add_column("usd_at_stake", justify="right")
        for row in found:
            table.add_row(
                *(text_value(row[n]) for n in ("decided_at", "policy", "target", "kind", "action")),
                "yes" if row["dry_run"] else "no",
                row["outcome"],
                money(row["usd_at_stake"]),
            )
        console.print(table)
    acted = [r for r in found if r["kind"] == "act"]
    saved = sum(r["usd_at_stake"] for r in acted if not r["dry_run"] and r["outcome"] == "done")
    would = sum(r["usd_at_stake"] for r in acted if r["dry_run"])
    err.print(
        f"{plural(len(found), 'step')}; actions saved {money(saved)}, dry runs would have "
        f"saved {money(would)}"
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `gpuledger` app."""
    app.command("guard")(guard_command)
    app.command("actions")(actions_command)
    app.add_typer(policies_app, name="policies")
