"""Through-the-worker tier: generated fleets published through the real broker to a real
`gpuledger worker` process, the views read back through clickhouse-connect and compared with
the reference model (money to 1e-9 relative). Each fleet gets topics of its own and a fresh
store. One more run kills the worker with SIGKILL mid-fleet, restarts it and re-sends part
of what it had taken: the answers must be the same.

A disagreement fails with the differences and the fleet as `gpuledger replay` lines (also
written to the test's folder); replaying it in process (tests/differential/inprocess.py)
tells whether the cost path or the store side disagrees.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from gpuledger.broker import EmbeddedBroker, ensure_topics
from gpuledger.schema.migrate import migrate
from gpuledger.schema.topics import Topics
from gpuledger.store import connect, ensure_store, stop_owned_stores
from tests.differential.inprocess import InProcessWorker
from tests.reference.compare import differences
from tests.reference.fleets import T0, Fleet, fleets
from tests.reference.model import Expected, expect, views
from tests.support import Sender, WorkerProcess, batch, env_for, rows, scalar, wait_until

pytestmark = pytest.mark.integration

IDLE_AFTER_S = 30.0
EXAMPLES = int(os.environ.get("GPULEDGER_DIFF_WORKER_EXAMPLES", "4"))
SETTLE_S = float(os.environ.get("GPULEDGER_DIFF_SETTLE_S", "60"))
STEADY_S = 4.0  # longer than a worker holds a sample on a quiet partition (3 s of wall time)
CHECKED = {
    "fleets": 0,
    "messages": 0,
    "late_metadata": 0,
    "samples": 0,
    "rows": 0,
    "alerts": 0,
    "late_idle_jobs": 0,
}
WORKER_FLEETS = fleets(max_nodes=3, max_gpus=3, max_steps=8, idle_after_s=IDLE_AFTER_S)


class Run:
    """One fleet's own topics, store and worker on the shared broker."""

    def __init__(self, bootstrap: str, folder: Path, name: str) -> None:
        self.folder = folder / name
        self.folder.mkdir(parents=True)
        self.topics = Topics(prefix=f"{name}.")
        ensure_topics(bootstrap, self.topics)
        self.store_path = (self.folder / "store").resolve()
        ensure_store(self.store_path)
        store_url = f"chdb://{self.store_path}"
        self.client = connect(store_url, start=False)
        migrate(self.client)
        self.sender = Sender(bootstrap, self.topics)
        self.env = env_for(
            bootstrap,
            store_url,
            self.folder / "data",
            GPULEDGER_TOPIC_PREFIX=self.topics.prefix,
            GPULEDGER_SESSION_TIMEOUT_MS="6000",
            GPULEDGER_IDLE_ALERT_AFTER_S=str(IDLE_AFTER_S),
            GPULEDGER_IDLE_UPDATE_EVERY_S="0",
        )
        self.worker = WorkerProcess(self.env, self.folder / "worker.log")

    def send(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            self.sender.send(message["topic"], message["key"], message["value"])
        self.sender.flush()

    def close(self) -> None:
        self.worker.stop(signal.SIGKILL)
        self.sender.close()
        self.client.close()
        stop_owned_stores(self.store_path)


@pytest.fixture(scope="module")
def bootstrap(broker: EmbeddedBroker) -> str:
    return broker.bootstrap


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("differential")


def read_views(client: Any) -> dict[str, dict[Any, dict[str, Any]]]:
    """The views and fact totals as the reference model returns them."""

    def table(sql: str, width: int, names: list[str]) -> dict[Any, dict[str, Any]]:
        out = {}
        for row in rows(client, sql):
            key = row[0] if width == 1 else tuple(row[:width])
            out[key] = dict(zip(names, row[width:], strict=True))
        return out

    ms = "toUnixTimestamp64Milli({}) / 1000"
    return {
        "job_costs": table(
            "SELECT job_id, team, project, job_type, experiment_id, state, gpu_seconds, "
            "cost_usd, idle_cost_usd, mean_util_sm, gpus, "
            f"{ms.format('first_ts')}, {ms.format('last_ts')}, mean_sm_active, model, "
            "environment FROM gpuledger.job_costs",
            1,
            [
                "team",
                "project",
                "job_type",
                "experiment_id",
                "state",
                "gpu_seconds",
                "cost_usd",
                "idle_cost_usd",
                "mean_util_sm",
                "gpus",
                "first_ts",
                "last_ts",
                "mean_sm_active",
                "model",
                "environment",
            ],
        ),
        "team_daily": table(
            "SELECT toString(day), team, gpu_hours, cost_usd, idle_cost_usd, "
            "allocated_cost_usd, price_missing_gpu_hours, mean_util_sm FROM gpuledger.team_daily",
            2,
            [
                "gpu_hours",
                "cost_usd",
                "idle_cost_usd",
                "allocated_cost_usd",
                "price_missing_gpu_hours",
                "mean_util_sm",
            ],
        ),
        "project_effective_cost": table(
            "SELECT project, total_spend_usd, jobs_finished, jobs_succeeded, job_success_rate, "
            "resource_utilization, effective_cost_usd, sm_utilization, effective_cost_sm_usd "
            "FROM gpuledger.project_effective_cost",
            1,
            [
                "total_spend_usd",
                "jobs_finished",
                "jobs_succeeded",
                "job_success_rate",
                "resource_utilization",
                "effective_cost_usd",
                "sm_utilization",
                "effective_cost_sm_usd",
            ],
        ),
        "inference_unit_cost": table(
            "SELECT job_id, toString(day), cost_usd, requests, tokens, usd_per_1k_requests, "
            "usd_per_1m_tokens FROM gpuledger.inference_unit_cost",
            2,
            ["cost_usd", "requests", "tokens", "usd_per_1k_requests", "usd_per_1m_tokens"],
        ),
        "idle_waste": table(
            "SELECT team, project, job_id, gpu_uuid, node, gpu_seconds, cost_usd, "
            "idle_gpu_seconds, idle_cost_usd FROM gpuledger.idle_waste",
            5,
            ["gpu_seconds", "cost_usd", "idle_gpu_seconds", "idle_cost_usd"],
        ),
        "totals": table(
            "SELECT 'all', sum(sign), sum(cost_usd * sign), sum(idle_cost_usd * sign), "
            "sum(toFloat64(duration_s) * share * sign), sumIf(sign, price_missing = 1) "
            "FROM gpuledger.cost_facts",
            1,
            ["rows", "cost_usd", "idle_cost_usd", "gpu_seconds", "price_missing_rows"],
        ),
    }


def read_jobs(client: Any) -> dict[str, dict[str, Any]]:
    found = rows(
        client,
        "SELECT job_id, state, team, project, job_type, experiment_id, model, environment, "
        "toUnixTimestamp64Milli(started_at) / 1000, toUnixTimestamp64Milli(ended_at) / 1000, "
        "arraySort(gpu_uuids) FROM gpuledger.jobs FINAL",
    )
    names = [
        "state",
        "team",
        "project",
        "job_type",
        "experiment_id",
        "model",
        "environment",
        "started_at",
        "ended_at",
        "gpu_uuids",
    ]
    return {r[0]: dict(zip(names, (*r[1:10], tuple(r[10])), strict=True)) for r in found}


def read_alerts(client: Any) -> set[tuple[str, str]]:
    found = rows(
        client,
        "SELECT DISTINCT gpu_uuid, job_id FROM gpuledger.alerts "
        "WHERE kind = 'idle_allocated_gpu' AND state = 'firing'",
    )
    return {(g, j) for g, j in found}


def disagreements(run: Run, expected: Expected) -> list[str]:
    found = differences({"jobs": expected.jobs}, {"jobs": read_jobs(run.client)})
    found += differences(expected.views, read_views(run.client))
    alerts = read_alerts(run.client)
    if alerts != expected.alerts:
        found.append(f"idle alerts: reference {sorted(expected.alerts)}, worker {sorted(alerts)}")
    return found


def in_process(fleet: Fleet, expected: Expected) -> str:
    """Whether the cost path alone, in process, agrees on this fleet (where to look)."""
    worker = InProcessWorker()
    for message in fleet.messages:
        worker.take(message["topic"], message["value"])
    jobs = worker.jobs()
    found = differences({"jobs": expected.jobs}, {"jobs": jobs})
    found += differences(expected.views, views(worker.rows(), jobs, worker.usage))
    return (
        "agrees (look at the store side)"
        if not found
        else "disagrees too:\n" + "\n".join(found[:20])
    )


def settle(run: Run, fleet: Fleet, expected: Expected) -> None:
    """Wait until the worker's answers are the reference's and stay so for longer than the
    worker holds a sample; fail with what differs."""
    deadline = time.monotonic() + SETTLE_S
    agreed_at: float | None = None
    while True:
        found = disagreements(run, expected)
        now = time.monotonic()
        if found:
            agreed_at = None
        elif agreed_at is None:
            agreed_at = now
        elif now - agreed_at >= STEADY_S:
            break
        if found and now >= deadline:
            break
        time.sleep(1.0)
    if found:
        (run.folder / "fleet.jsonl").write_text(fleet.jsonl() + "\n")
        raise AssertionError(
            f"the worker disagrees with the reference after {SETTLE_S:.0f} s:\n"
            + "\n".join(found[:40])
            + f"\nthe cost path in process: {in_process(fleet, expected)}"
            + f"\n{fleet!r}\nworker logs: {run.folder}"
        )
    CHECKED["fleets"] += 1
    CHECKED["messages"] += len(fleet.messages)
    CHECKED["late_metadata"] += fleet.late()
    CHECKED["samples"] += fleet.samples()
    CHECKED["rows"] += len(expected.rows)
    CHECKED["alerts"] += len(expected.alerts)
    first = next(i for i, m in enumerate(fleet.messages) if m["topic"] == "samples")
    CHECKED["late_idle_jobs"] += sum(
        1 for m in fleet.messages[first:] if m["key"].startswith("idle-job")
    )


RUNS = iter(range(10**6))


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.generate],  # shrinking through a worker takes minutes a step
    suppress_health_check=list(HealthCheck),
)
@given(fleet=WORKER_FLEETS)
def test_the_worker_agrees_with_the_reference_on_generated_fleets(
    bootstrap: str, folder: Path, fleet: Fleet
) -> None:
    expected = expect(fleet.messages, idle_after_s=IDLE_AFTER_S)
    run = Run(bootstrap, folder, f"fleet{next(RUNS)}")
    try:
        run.worker.start()
        run.send(fleet.messages)
        settle(run, fleet, expected)
    finally:
        run.close()


@settings(
    max_examples=1,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@given(fleet=WORKER_FLEETS.filter(lambda f: f.count("usage") >= 2 and f.count("prices") > 0))
def test_a_worker_killed_mid_fleet_and_sent_messages_again_gives_the_same_answers(
    bootstrap: str, folder: Path, fleet: Fleet
) -> None:
    expected = expect(fleet.messages, idle_after_s=IDLE_AFTER_S)
    run = Run(bootstrap, folder, f"killed{next(RUNS)}")
    half = len(fleet.messages) // 2
    try:
        run.worker.start()
        run.send(fleet.messages[:half])
        wait_until(
            lambda: scalar(run.client, "SELECT count() FROM gpuledger.cost_facts"),
            what="the first facts stored before the kill",
        )
        assert run.worker.stop(signal.SIGKILL) == -signal.SIGKILL
        # A log of its own: the first life's "worker ready" must not pass for this one's.
        run.worker = WorkerProcess(run.env, run.folder / "worker-restarted.log")
        run.worker.start()
        # What the dead worker had taken comes again (an agent re-sending, a spool
        # replayed), then the rest.
        run.send(fleet.messages[half // 2 :])
        run.send([m for m in fleet.messages if m["topic"] == "usage"][:2])  # sent twice
        settle(run, fleet, expected)
    finally:
        run.close()


def test_a_restarted_worker_alerts_on_the_idle_time_its_owed_corrections_restate(
    bootstrap: str, folder: Path
) -> None:
    """An idle GPU's facts are stored unallocated; the worker dies; the job that held the GPU
    is announced while it is down. The restarted worker restates the facts as it takes its
    partition over, after it rebuilt its idle episodes from the store: the restated idle
    time must still fire the alert."""
    run = Run(bootstrap, folder, f"owed{next(RUNS)}")

    def sample(k: int) -> dict[str, Any]:
        idle = 2 <= k < 2 + int(IDLE_AFTER_S) + 8
        return {
            "v": 1,
            "ts": T0 + k,
            "node": "n",
            "gpu_uuid": "GPU-x",
            "gpu_name": "NVIDIA H100 80GB HBM3",
            "util_sm": 0.0 if idle else 0.5,
        }

    try:
        run.worker.start()
        steps = int(IDLE_AFTER_S) + 15
        run.send(
            [
                {"topic": "samples", "key": "n", "value": batch("n", [sample(k)])}
                for k in range(steps)
            ]
        )
        wait_until(
            lambda: scalar(run.client, "SELECT count() FROM gpuledger.cost_facts") >= steps - 1,
            what="the samples stored",
        )
        assert run.worker.stop(signal.SIGKILL) == -signal.SIGKILL
        start = {"v": 1, "ts": T0 - 5, "job_id": "j", "state": "running"}
        start |= {"gpu_uuids": ["GPU-x"], "started_at": T0 - 5}
        run.send([{"topic": "jobs", "key": "j", "value": start}])
        run.worker = WorkerProcess(run.env, run.folder / "worker-restarted.log")
        run.worker.start()
        wait_until(
            lambda: scalar(
                run.client, "SELECT sum(sign) FROM gpuledger.cost_facts WHERE job_id = 'j'"
            ),
            what="the facts restated to the job",
        )
        wait_until(lambda: read_alerts(run.client), timeout_s=30, what="the idle alert")
        assert read_alerts(run.client) == {("GPU-x", "j")}
    finally:
        run.close()


def test_the_worker_tier_checked_fleets() -> None:
    """Runs after the two properties (file order): how much they checked."""
    print(f"\nworker tier checked {CHECKED}")
    assert CHECKED["fleets"] >= 1 + min(EXAMPLES, 1)
