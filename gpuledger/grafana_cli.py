"""Grafana and scheduler commands: grafana export|sync, k8s watch, slurm start-args|finish-args"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gpuledger.cli_context import command_group, console, err
from gpuledger.schedulers.k8s import LabelNames

grafana_app = command_group(
    "Dashboards and alert rules as code, for Grafana's ClickHouse data source."
)
k8s_app = command_group("Job events from Kubernetes.")
slurm_app = command_group("Helpers of the Slurm Prolog/Epilog scripts in deploy/slurm/.")

ClickHouseUrl = Annotated[
    str | None,
    typer.Option(
        "--clickhouse-url",
        help="Where Grafana reaches ClickHouse: clickhouse://USER[:PASSWORD]@HOST:PORT/DATABASE "
        "(clickhouses:// for TLS, ?protocol=native for the native port).",
    ),
]
TeamBurn = Annotated[
    float,
    typer.Option(help="USD per hour a team may burn before the burn-rate alert rule fires."),
]


@grafana_app.command("export")
def grafana_export(
    directory: Annotated[Path, typer.Argument(help="Folder to write into (created if missing).")],
    clickhouse_url: ClickHouseUrl = None,
    team_usd_per_hour: TeamBurn = 500.0,
    dashboards_path: Annotated[
        str, typer.Option(help="Where Grafana finds the dashboard JSON (provider path).")
    ] = "/var/lib/grafana/dashboards/gpuledger",
) -> None:
    """Write the dashboards (JSON), alert rules and Grafana provisioning files.

    The data source file never holds a password: Grafana reads it from its environment
    variable GPULEDGER_CLICKHOUSE_PASSWORD.
    """
    from gpuledger.grafana.provisioning import (
        DEFAULT_CLICKHOUSE_URL,
        ClickHouseEndpoint,
        ProvisioningError,
        export,
    )

    try:
        endpoint = ClickHouseEndpoint.from_url(clickhouse_url or DEFAULT_CLICKHOUSE_URL)
        written = export(
            directory,
            endpoint=endpoint,
            team_usd_per_hour=team_usd_per_hour,
            dashboards_path=dashboards_path,
        )
    except (ProvisioningError, ValueError) as exc:
        err.print(str(exc), style="red", markup=False)
        raise typer.Exit(2) from exc
    dashboards = sum(1 for p in written if p.suffix == ".json")
    console.print(
        f"wrote {dashboards} dashboards, alert rules and provisioning files "
        f"({len(written)} files) under {directory}"
    )


@grafana_app.command("sync")
def grafana_sync(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="GRAFANA_URL", help="Grafana's base URL, e.g. http://grafana:3000")
    ],
    token: Annotated[
        str,
        typer.Option(envvar="GRAFANA_TOKEN", help="Service account token (Editor or Admin)."),
    ],
    clickhouse_url: ClickHouseUrl = None,
    team_usd_per_hour: TeamBurn = 500.0,
) -> None:
    """Push folder, data source, dashboards and alert rules to Grafana (idempotent).

    The data source defaults to the store setting (GPULEDGER_STORE) when it is a
    clickhouse:// URL; an embedded chdb:// store needs --clickhouse-url.
    """
    from gpuledger.grafana.provisioning import (
        ClickHouseEndpoint,
        ProvisioningError,
        boards,
        rules_json,
    )
    from gpuledger.grafana.sync import SyncError, connect, sync
    from gpuledger.store import redact_store_url

    settings = ctx.obj
    target = clickhouse_url or (settings.store if settings and settings.store else None)
    if not target or not target.startswith(("clickhouse://", "clickhouses://")):
        err.print(
            "[red]no ClickHouse address for Grafana: pass --clickhouse-url "
            "clickhouse://USER:PASSWORD@HOST:8123/gpuledger (GPULEDGER_STORE is "
            f"{redact_store_url(target) if target else 'unset'})[/red]"
        )
        raise typer.Exit(2)
    try:
        endpoint = ClickHouseEndpoint.from_url(target)
        report = sync(
            connect(url, token),
            endpoint=endpoint,
            boards=boards(),
            rules=rules_json(team_usd_per_hour=team_usd_per_hour),
        )
    except (ProvisioningError, SyncError, ValueError) as exc:
        err.print(str(exc), style="red", markup=False)
        raise typer.Exit(1) from exc
    console.print(f"synced Grafana at {redact_store_url(url)}: {report.summary()}")


LABELS = LabelNames()  # the pod labels read by default


def _pod_label(what: str) -> Any:
    """An option naming the pod label that holds `what`."""
    return typer.Option(help=f"Pod label holding {what}.")


@k8s_app.command("watch")
def k8s_watch(
    ctx: typer.Context,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(help="kubeconfig file (default: in-cluster config, else ~/.kube/config)."),
    ] = None,
    context: Annotated[str | None, typer.Option(help="kubeconfig context.")] = None,
    namespace: Annotated[
        str | None, typer.Option(help="Watch one namespace (default: all namespaces).")
    ] = None,
    selector: Annotated[str | None, typer.Option(help="Label selector of the pods.")] = None,
    job_id_label: Annotated[str, _pod_label("the job id")] = LABELS.job_id,
    team_label: Annotated[str, _pod_label("the team")] = LABELS.team,
    project_label: Annotated[str, _pod_label("the project")] = LABELS.project,
    job_type_label: Annotated[str, _pod_label("the job type")] = LABELS.job_type,
    experiment_label: Annotated[str, _pod_label("the experiment id")] = LABELS.experiment_id,
    model_label: Annotated[str, _pod_label("the model the job trains or serves")] = LABELS.model,
    environment_label: Annotated[
        str, _pod_label("the environment (prod, staging, dev, ...)")
    ] = LABELS.environment,
) -> None:
    """Publish job events for pods that request nvidia.com/gpu (until Ctrl-C or SIGTERM).

    Pod phase becomes the job state; team, project, job type, experiment, model and
    environment come from the labels named by the options.
    """
    import os
    import signal

    from kubernetes import client, config

    from gpuledger.runtime import Publisher
    from gpuledger.schedulers.k8s import watch_pods
    from gpuledger.schema.messages import JobEvent

    if kubeconfig is None and context is None and "KUBERNETES_SERVICE_HOST" in os.environ:
        config.load_incluster_config()
    else:
        config.load_kube_config(
            config_file=str(kubeconfig) if kubeconfig else None, context=context
        )
    names = LabelNames(
        job_id_label,
        team_label,
        project_label,
        job_type_label,
        experiment_label,
        model_label,
        environment_label,
    )
    stopping = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with Publisher(ctx.obj) as pub:

        def publish(event: JobEvent) -> None:
            pub.send("jobs", event.job_id, event.model_dump_json(exclude_none=True).encode())
            err.print(f"job {event.job_id}: {event.state}")

        count = watch_pods(
            client.CoreV1Api(),
            publish,
            names=names,
            namespace=namespace,
            label_selector=selector,
            stop=lambda: stopping["now"],
        )
    console.print(f"k8s watch stopped after publishing {count} job events")


@slurm_app.command("start-args")
def slurm_start_args() -> None:
    """Print `gpuledger jobs start` arguments for the job of this Slurm Prolog."""
    from gpuledger.schedulers.slurm import main

    raise typer.Exit(main(["start-args"]))


@slurm_app.command("finish-args")
def slurm_finish_args() -> None:
    """Print `gpuledger jobs finish` arguments for the job of this Slurm Epilog."""
    from gpuledger.schedulers.slurm import main

    raise typer.Exit(main(["finish-args"]))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `gpuledger` app."""
    app.add_typer(grafana_app, name="grafana")
    app.add_typer(k8s_app, name="k8s")
    app.add_typer(slurm_app, name="slurm")
