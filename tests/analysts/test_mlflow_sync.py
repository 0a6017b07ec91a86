"""`gpuledger mlflow sync`: a finished job's cost lands on the MLflow run named by its
experiment_id, in a real local MLflow tracking store (sqlite)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client
from typer.testing import CliRunner

from gpuledger.analysts.mlflow_sync import INSTALL_HINT
from gpuledger.cli import app
from gpuledger.schema.migrate import migrate
from tests.analysts.seed import HOUR, T0, Job, fact, insert_facts, insert_jobs

try:
    from mlflow.tracking import MlflowClient
except ImportError:  # the extra is part of `make test`: its absence is a broken setup
    pytest.fail(f"{INSTALL_HINT}; `make test` installs it", pytrace=False)


# MLflow 3.17's own sqlite store uses a SQLAlchemy loader option that SQLAlchemy 2.1 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def sync(store_url: str, tracking_uri: str, *extra: str) -> str:
    result = CliRunner().invoke(
        app, ["--store", store_url, "mlflow", "sync", "--tracking-uri", tracking_uri, *extra]
    )
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_finished_jobs_log_their_gpu_cost_to_their_mlflow_run(
    store_url: str, ch: Client, tmp_path: Path
) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(tracking_uri=tracking_uri)
    run_id = mlflow.create_run(mlflow.create_experiment("detector")).info.run_id
    unfinished_run = mlflow.create_run(mlflow.create_experiment("chat")).info.run_id

    migrate(ch)
    job = Job("train-m1", "succeeded", "vision", "detector", "training", "", [], T0, None)
    tracked = replace(job, experiment_id=run_id, gpu_uuids=["H100-0"], ended_at=T0 + 3 * HOUR)
    lost = replace(
        job, job_id="train-m2", state="failed", experiment_id="0" * 32, ended_at=T0 + HOUR
    )
    running = replace(job, job_id="train-m3", state="running", experiment_id=unfinished_run)
    insert_jobs(ch, [tracked, lost, running])
    # train-m1: 3 H100-hours at $4, 20 %, 50 % and 90 % busy.
    insert_facts(
        ch,
        [
            fact(T0 + h * HOUR, "H100-0", "H100", tracked, util=util, mem_gb=20)
            for h, util in ((0, 0.2), (1, 0.5), (2, 0.9))
        ]
        + [fact(T0, "H100-1", "H100", lost, util=0.5, mem_gb=20)]
        + [fact(T0, "H100-2", "H100", running, util=0.5, mem_gb=20)],
    )

    said = sync(store_url, tracking_uri)
    assert "MLflow sync: 1 runs logged, 0 unchanged, 1 not found" in said
    assert f"job train-m2: experiment_id {'0' * 32} is no run in the tracking store" in said
    run = mlflow.get_run(run_id)
    assert run.data.metrics == pytest.approx(
        {
            "gpuledger.gpu_cost_usd": 12.0,
            "gpuledger.gpu_hours": 3.0,
            "gpuledger.idle_cost_usd": 4 * 0.8 + 4 * 0.5 + 4 * 0.1,
            "gpuledger.mean_util_sm": (0.2 + 0.5 + 0.9) / 3,
        }
    )
    assert run.data.tags["gpuledger.job_id"] == "train-m1"
    assert run.data.tags["gpuledger.state"] == "succeeded"
    history = mlflow.get_metric_history(run_id, "gpuledger.gpu_cost_usd")
    assert [(m.step, m.timestamp) for m in history] == [
        (0, int((T0 + 3 * HOUR).timestamp() * 1000))
    ]
    assert mlflow.get_run(unfinished_run).data.metrics == {}  # still running: nothing yet

    # Again: nothing changed, nothing is logged twice.
    assert "0 runs logged, 1 unchanged" in sync(store_url, tracking_uri)
    assert len(mlflow.get_metric_history(run_id, "gpuledger.gpu_cost_usd")) == 1

    # A late correction (an hour restated from unallocated to the job) reaches the run.
    late = T0 + 3 * HOUR
    insert_facts(
        ch,
        [
            fact(late, "H100-0", "H100", None, util=0.9, mem_gb=20),
            fact(late, "H100-0", "H100", None, util=0.9, mem_gb=20, sign=-1),
            fact(late, "H100-0", "H100", tracked, util=0.9, mem_gb=20),
        ],
    )
    assert "1 runs logged" in sync(store_url, tracking_uri, "--job", "train-m1")
    assert mlflow.get_run(run_id).data.metrics["gpuledger.gpu_cost_usd"] == pytest.approx(16.0)


def test_sync_without_the_mlflow_extra_says_how_to_install_it() -> None:
    # A Python where `import mlflow` fails, as in an install without the extra.
    program = (
        "import sys; sys.modules['mlflow'] = None; sys.modules['mlflow.tracking'] = None; "
        "sys.argv = ['gpuledger', 'mlflow', 'sync']; from gpuledger.cli import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "pip install 'gpuledger[mlflow]'" in " ".join(done.stderr.split())
