"""One example per sub-command, shown at the end of its `--help`.

Kept in one table so that they read as a tour and stay in step with the README; each line
fits an 80-column terminal. `attach` puts them on the commands before the CLI runs.
"""

from __future__ import annotations

from typing import Any

EXAMPLES: dict[str, list[str]] = {
    "settings": ["gpuledger settings", "gpuledger --set grace_s=2 settings"],
    "up": ["gpuledger up", "gpuledger up --duration 60 --no-board"],
    "worker": [
        "GPULEDGER_BOOTSTRAP=kafka:9092 \\",
        "  GPULEDGER_STORE=clickhouse://gpuledger:SECRET@ch:8123/gpuledger \\",
        "  gpuledger worker",
    ],
    "agent": [
        "GPULEDGER_BOOTSTRAP=kafka:9092 gpuledger agent --metrics-port 9400",
        "gpuledger --bootstrap 127.0.0.1:9092 agent \\",
        "  --simulate agents/scenarios/demo.toml --duration 60",
    ],
    "broker": ["gpuledger broker --port 9092"],
    "store": ["gpuledger store ~/ledger-store --port 8123"],
    "replay": ["gpuledger replay november.jsonl"],
    "query": [
        'gpuledger query -f json "SELECT team, sum(cost_usd * sign) AS usd \\',
        '  FROM gpuledger.cost_facts GROUP BY team"',
        "gpuledger query --file costs.sql -f csv > costs.csv",
    ],
    "alerts": ["gpuledger alerts --firing", "gpuledger alerts --since 2h -f json"],
    "recommend": ["gpuledger recommend --period 30d", "gpuledger recommend -f json --save"],
    "report": [
        "gpuledger report --period 7d --out report.html",
        "gpuledger report --from 2026-11-01 --to 2026-12-01 --out nov.html",
    ],
    "db migrate": [
        "gpuledger --store clickhouse://admin:SECRET@ch:8123/gpuledger db migrate",
        "GPULEDGER_STORE_CLUSTER=gpuledger gpuledger db migrate",
        "gpuledger db migrate --cluster gpuledger --print > cluster.sql",
    ],
    "jobs start": [
        "gpuledger jobs start train-42 --gpu GPU-0f1e... --team vision \\",
        "  --project detector --job-type training --model yolo-v9 --environment prod",
    ],
    "jobs finish": ["gpuledger jobs finish train-42 --state succeeded"],
    "prices load": [
        "gpuledger prices load                 # the packaged public list prices",
        "gpuledger prices load my_prices.csv",
    ],
    "budgets load": ["gpuledger budgets load budgets.csv"],
    "value load": ["gpuledger value load values.csv"],
    "budgets show": ["gpuledger budgets show", "gpuledger budgets show -f csv"],
    "export focus": [
        "gpuledger export focus --from 2026-11-01 --to 2026-12-01 --out nov.csv",
        "gpuledger export focus --period 30d --out last30.parquet",
    ],
    "mlflow sync": [
        "MLFLOW_TRACKING_URI=http://mlflow:5000 gpuledger mlflow sync",
        "gpuledger mlflow sync --job train-42   # from a job's epilog",
    ],
    "grafana export": ["gpuledger grafana export grafana-out/"],
    "grafana sync": ["gpuledger grafana sync --url https://grafana.example --token $TOKEN"],
    "k8s watch": ["KUBECONFIG=~/.kube/config gpuledger k8s watch --namespace ml"],
    "slurm start-args": ["gpuledger jobs start $(gpuledger slurm start-args)  # in a Prolog"],
    "slurm finish-args": ["gpuledger jobs finish $(gpuledger slurm finish-args)  # an Epilog"],
    "policies check": ["gpuledger policies check policies.toml"],
    "guard": [
        "GPULEDGER_STORE=clickhouse://guard:SECRET@ch:8123/gpuledger \\",
        "  gpuledger guard --policies policies.toml",
    ],
    "actions": [
        "gpuledger actions --since 7d",
        "gpuledger actions --policy idle-notebooks -f json",
    ],
}


def epilog(name: str) -> str | None:
    """The `--help` epilog of a command (`"jobs start"`), laid out as written (`\\b`)."""
    lines = EXAMPLES.get(name)
    if not lines:
        return None
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in lines)


def attach(app: Any, prefix: str = "") -> None:
    """Give each registered command of a typer app (and of its groups) its example."""
    for command in app.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        command.epilog = command.epilog or epilog(f"{prefix}{name}")
    for group in app.registered_groups:
        attach(group.typer_instance, f"{prefix}{group.name} ")
