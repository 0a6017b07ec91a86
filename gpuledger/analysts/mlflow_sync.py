"""Cost where the experiment lives: a finished job whose `experiment_id` is an MLflow run id
gets its GPU cost, GPU-hours, idle cost and mean utilization logged to that run.

Needs the optional extra `gpuledger[mlflow]` (mlflow-skinny with sqlalchemy and alembic for
a `sqlite:///…` tracking store). Metrics (step 0, timestamped at the job's end):
`gpuledger.gpu_cost_usd`, `gpuledger.gpu_hours`, `gpuledger.idle_cost_usd`,
`gpuledger.mean_util_sm` (left out when no GPU reported utilization); tags
`gpuledger.job_id`, `gpuledger.team`, `gpuledger.project`, `gpuledger.state`.
Syncing again logs only what changed (a late correction), so running it on a schedule, or
with `--watch`, never piles up copies.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gpuledger.analysts.window import as_utc

METRIC_PREFIX = "gpuledger."
# MLflow run ids are uuid4 hex: 32 lower-case hex digits.
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
INSTALL_HINT = (
    "MLflow is not installed: install the extra with `pip install 'gpuledger[mlflow]'` "
    "(mlflow-skinny, sqlalchemy and alembic)"
)


class MlflowMissing(RuntimeError):
    """The optional MLflow extra is not installed."""


@dataclass(frozen=True)
class FinishedJob:
    """A finished job's cost, from the `job_costs` view."""

    job_id: str
    experiment_id: str
    team: str
    project: str
    state: str
    ended_at: datetime | None
    last_ts: datetime
    gpu_hours: float
    cost_usd: float
    idle_cost_usd: float
    mean_util_sm: float | None


@dataclass(frozen=True)
class SyncResult:
    job_id: str
    run_id: str
    outcome: str  # logged | unchanged | no_such_run
    metrics: dict[str, float]


def run_metrics(job: FinishedJob) -> dict[str, float]:
    """The metrics a job's run gets (mean utilization only where some GPU reported one)."""
    metrics = {
        f"{METRIC_PREFIX}gpu_cost_usd": job.cost_usd,
        f"{METRIC_PREFIX}gpu_hours": job.gpu_hours,
        f"{METRIC_PREFIX}idle_cost_usd": job.idle_cost_usd,
    }
    if job.mean_util_sm is not None:
        metrics[f"{METRIC_PREFIX}mean_util_sm"] = job.mean_util_sm
    return metrics


def run_tags(job: FinishedJob) -> dict[str, str]:
    return {
        f"{METRIC_PREFIX}job_id": job.job_id,
        f"{METRIC_PREFIX}team": job.team,
        f"{METRIC_PREFIX}project": job.project,
        f"{METRIC_PREFIX}state": job.state,
    }


def changed(logged: dict[str, float], wanted: dict[str, float]) -> dict[str, float]:
    """The metrics whose logged value differs from the wanted one (or was never logged)."""
    return {
        key: value
        for key, value in wanted.items()
        if key not in logged or not math.isclose(logged[key], value, rel_tol=1e-9, abs_tol=1e-12)
    }


# -- I/O -------------------------------------------------------------------------------------

_FINISHED_SQL = """
SELECT job_id, experiment_id, team, project, state, ended_at, last_ts, gpu_hours, cost_usd,
    idle_cost_usd, mean_util_sm
FROM gpuledger.job_costs
WHERE state IN ('succeeded', 'failed', 'preempted', 'cancelled')
    AND match(experiment_id, '^[0-9a-f]{32}$')
    AND ({job_id:String} = '' OR job_id = {job_id:String})
ORDER BY job_id
"""


def finished_jobs(client: Any, job_id: str = "") -> list[FinishedJob]:
    """Finished jobs whose experiment_id looks like an MLflow run id (all, or one)."""
    result = client.query(_FINISHED_SQL, parameters={"job_id": job_id})
    names = list(result.column_names)
    return [FinishedJob(**dict(zip(names, row, strict=True))) for row in result.result_rows]


def require_mlflow() -> None:
    """Raise MlflowMissing, saying how to install it, where the extra is not installed."""
    try:
        import mlflow.tracking  # noqa: F401
    except ImportError as exc:
        raise MlflowMissing(INSTALL_HINT) from exc


def tracking_client(tracking_uri: str) -> Any:
    """An `MlflowClient` for the URI."""
    require_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def log_job(mlflow: Any, job: FinishedJob) -> SyncResult:
    """Log one job's cost to its run, only what is not already there."""
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.get_run(job.experiment_id)
    except MlflowException:
        return SyncResult(job.job_id, job.experiment_id, "no_such_run", {})
    wanted = run_metrics(job)
    todo = changed(dict(run.data.metrics), wanted)
    if not todo:
        return SyncResult(job.job_id, job.experiment_id, "unchanged", wanted)
    stamp = int(as_utc(job.ended_at or job.last_ts).timestamp() * 1000)
    mlflow.log_batch(
        job.experiment_id,
        metrics=[Metric(key, value, stamp, 0) for key, value in sorted(todo.items())],
        tags=[RunTag(key, value) for key, value in run_tags(job).items()],
    )
    return SyncResult(job.job_id, job.experiment_id, "logged", wanted)


def sync(client: Any, mlflow: Any, job_id: str = "") -> list[SyncResult]:
    """Log every finished job's cost to its MLflow run (or only `job_id`'s)."""
    return [log_job(mlflow, job) for job in finished_jobs(client, job_id)]


def watch(
    client: Any,
    mlflow: Any,
    every_s: float,
    on_results: Callable[[Iterable[SyncResult]], None],
    *,
    rounds: int | None = None,
) -> None:
    """Sync every `every_s` seconds (forever, or `rounds` times): jobs get their cost soon
    after they finish, and late corrections follow."""
    done = 0
    while rounds is None or done < rounds:
        on_results(sync(client, mlflow))
        done += 1
        if rounds is None or done < rounds:
            time.sleep(every_s)
