"""Every sub-command run where its peers are missing, as a new user meets them: no store, no
broker, a store never migrated. None may show a traceback; each that fails says in its last
line what to set or run."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gpuledger.store import ensure_store, stop_owned_stores
from tests.support import ROOT, run_gpuledger

pytestmark = pytest.mark.e2e

NO_STORE = "clickhouse://127.0.0.1:1/gpuledger"
NO_BROKER = "127.0.0.1:1"
DEMO = str(ROOT / "agents" / "scenarios" / "demo.toml")

# argv (with {tmp} for a scratch folder), and what its failure must name. None: it needs no
# peer and must succeed.
COMMANDS: dict[str, tuple[list[str], str | None]] = {
    "settings": (["settings"], None),
    "up": (["up", "--duration", "5", "--no-board"], "GPULEDGER_"),
    "worker": (["worker"], "GPULEDGER_BOOTSTRAP"),
    "agent": (["agent", "--simulate", DEMO, "--duration", "3"], "spool"),
    "replay": (["replay", "{tmp}/records.jsonl"], "GPULEDGER_BOOTSTRAP"),
    "query": (["query", "SELECT count() FROM gpuledger.cost_facts"], "GPULEDGER_STORE"),
    "alerts": (["alerts"], "GPULEDGER_STORE"),
    "recommend": (["recommend"], "GPULEDGER_STORE"),
    "report": (["report", "--out", "{tmp}/r.html"], "GPULEDGER_STORE"),
    "db migrate": (["db", "migrate"], "GPULEDGER_STORE"),
    "jobs start": (["jobs", "start", "j1", "--gpu", "GPU-1"], "GPULEDGER_BOOTSTRAP"),
    "jobs finish": (["jobs", "finish", "j1"], "GPULEDGER_BOOTSTRAP"),
    "prices load": (["prices", "load"], "GPULEDGER_BOOTSTRAP"),
    "budgets load": (["budgets", "load", "{tmp}/budgets.csv"], "GPULEDGER_STORE"),
    "budgets show": (["budgets", "show"], "GPULEDGER_STORE"),
    "export focus": (["export", "focus", "--period", "7d", "--out", "{tmp}/f.csv"], "STORE"),
    "mlflow sync": (["mlflow", "sync", "--tracking-uri", "sqlite:///{tmp}/m.db"], "STORE"),
    "grafana export": (["grafana", "export", "{tmp}/grafana"], None),
    "grafana sync": (["grafana", "sync", "--url", "http://127.0.0.1:1", "--token", "t"], "url"),
    "k8s watch": (["k8s", "watch"], "KUBECONFIG"),
    "slurm start-args": (["slurm", "start-args"], "SLURM_JOB_ID"),
    "slurm finish-args": (["slurm", "finish-args"], "SLURM_JOB_ID"),
}
# With a store that answers but was never migrated, these must say to migrate.
NEEDS_SCHEMA = ["query", "alerts", "recommend", "report", "budgets show", "export focus"]


def _env(tmp: Path, store: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPULEDGER_", "SLURM_"))}
    env.update(
        GPULEDGER_STORE=store,
        GPULEDGER_BOOTSTRAP=NO_BROKER,
        GPULEDGER_DATA_DIR=str(tmp / "data"),
        GPULEDGER_PUBLISH_TIMEOUT_S="2",
        KUBECONFIG=str(tmp / "no-kubeconfig"),
        HOME=str(tmp),
        COLUMNS="80",
    )
    return env


def _run_all(
    names: list[str], tmp: Path, store: str
) -> dict[str, subprocess.CompletedProcess[str]]:
    (tmp / "records.jsonl").write_text('{"topic": "jobs", "key": "j", "value": {"v": 1}}\n')
    (tmp / "budgets.csv").write_text("month,team,project,budget_usd\n*,vision,,1000\n")
    env = _env(tmp, store)

    def one(name: str) -> subprocess.CompletedProcess[str]:
        argv = [a.replace("{tmp}", str(tmp)) for a in COMMANDS[name][0]]
        return run_gpuledger(*argv, env=env, cwd=tmp, timeout_s=120)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


@pytest.fixture(scope="module")
def without_peers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run_all(sorted(COMMANDS), tmp_path_factory.mktemp("no-peers"), NO_STORE)


@pytest.fixture(scope="module")
def unmigrated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("unmigrated")
    ensure_store(tmp / "store")
    try:
        yield _run_all(NEEDS_SCHEMA, tmp, f"chdb://{tmp / 'store'}")
    finally:
        stop_owned_stores(tmp / "store")


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_store_and_no_broker_give_one_line_with_the_fix(
    without_peers: dict[str, subprocess.CompletedProcess[str]], name: str
) -> None:
    done = without_peers[name]
    shown = done.stdout + done.stderr
    assert "Traceback" not in shown, shown[-3000:]
    fix = COMMANDS[name][1]
    if fix is None:
        assert done.returncode == 0, shown[-2000:]
        return
    assert done.returncode != 0, shown[-2000:]
    assert "unexpected" not in _last_line(done), _last_line(done)
    assert fix.lower() in _last_line(done).lower(), shown[-2000:]


@pytest.mark.parametrize("name", NEEDS_SCHEMA)
def test_a_store_never_migrated_says_to_migrate(
    unmigrated: dict[str, subprocess.CompletedProcess[str]], name: str
) -> None:
    done = unmigrated[name]
    assert "Traceback" not in done.stdout + done.stderr
    assert done.returncode == 3, done.stderr[-2000:]
    assert "gpuledger db migrate" in _last_line(done)
