"""Idle allocated GPU and budget alerts from a real `gpuledger worker`, on the real broker and
store, delivered to a real Alertmanager and a webhook.

Event times are in January 2026 and samples are replayed history, so ten idle minutes take
no ten minutes of wall time: the worker decides on event time. A firing alert resolves
after two busy minutes in a row, and is updated every ten. The GPUs cost $4.00 an hour
(the price the fixture publishes) and idle samples have util_sm 0, so an idle second wastes
4 / 3600 dollars. Each test uses its own GPUs, jobs and day.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from gpuledger.broker import EmbeddedBroker
from gpuledger.schema.messages import (
    Alert,
    JobEvent,
    JobState,
    JobType,
    PriceEntry,
    PricingModel,
    ProcessLabels,
    ProcessSample,
)
from gpuledger.schema.migrate import migrate
from gpuledger.schema.topics import Topics
from gpuledger.store import connect
from tests.alerts.peers import Alertmanager, WebhookReceiver
from tests.support import (
    ROOT,
    GiB,
    Sender,
    WorkerProcess,
    batch,
    env_for,
    gpu_sample,
    read_topic,
    rows,
    sample_record,
    wait_until,
)

pytestmark = pytest.mark.integration

USD_PER_SECOND = 4.0 / 3600


def at(day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(2026, 1, day, hour, minute, tzinfo=UTC).timestamp()


def sample(
    gpu: str, ts: float, util: float, *, node: str, interval: float = 1.0, index: int = 0
) -> dict[str, Any]:
    """A sample as JSON; an idle GPU draws 90 W."""
    built = gpu_sample(
        gpu, ts, node=node, gpu_index=index, interval_s=interval, util_sm=util, util_mem=util,
        mem_used_bytes=12 * GiB, mem_total_bytes=80 * GiB, power_w=90.0 if util == 0 else 500.0,
        power_limit_w=700.0, temp_c=40.0,
    )  # fmt: skip
    return sample_record(built)


@dataclass
class World:
    tmp: Path
    bootstrap: str
    store_url: str
    client: Any
    alertmanager: Alertmanager
    webhook: WebhookReceiver
    env: dict[str, str]
    worker: WorkerProcess
    sender: Sender

    def start_job(
        self,
        job_id: str,
        gpus: list[str],
        t: float,
        *,
        team: str,
        project: str,
        job_type: JobType,
        labels: dict[str, str] | None = None,
    ) -> None:
        event = JobEvent(
            ts=t,
            job_id=job_id,
            state=JobState.running,
            team=team,
            project=project,
            job_type=job_type,
            gpu_uuids=gpus,
            started_at=t,
            labels=labels,
        )
        self.sender.send("jobs", job_id, event)
        self.sender.flush()
        # A scheduler announces a job before its first samples: let the worker know it first.
        wait_until(
            lambda: rows(
                self.client, "SELECT 1 FROM gpuledger.jobs WHERE job_id = {j:String}", j=job_id
            ),
            what=f"the start of {job_id} to be stored",
        )

    def end_job(self, job_id: str, t: float, state: JobState = JobState.succeeded) -> None:
        self.sender.send("jobs", job_id, JobEvent(ts=t, job_id=job_id, state=state, ended_at=t))
        self.sender.flush()
        wait_until(
            lambda: rows(
                self.client,
                "SELECT 1 FROM gpuledger.jobs FINAL WHERE job_id = {j:String} "
                "AND ended_at IS NOT NULL",
                j=job_id,
            ),
            what=f"the end of {job_id} to be stored",
        )

    def send(self, node: str, samples: Sequence[dict[str, Any]], per_message: int = 120) -> None:
        """As an agent draining its spool: many samples a message, in time order."""
        ordered = sorted(samples, key=lambda s: s["ts"])
        for i in range(0, len(ordered), per_message):
            self.sender.send("samples", node, batch(node, ordered[i : i + per_message]))
        self.sender.flush()

    def facts(self, gpu: str) -> int:
        return int(
            rows(
                self.client,
                "SELECT count() FROM gpuledger.cost_facts WHERE gpu_uuid = {g:String}",
                g=gpu,
            )[0][0]
        )

    def alerts(self, gpu: str) -> list[tuple[str, float, float, float, float]]:
        """(state, ts, since, idle_seconds, wasted_usd) of a GPU's alert rows, in order."""
        found = rows(
            self.client,
            """SELECT state, toUnixTimestamp64Milli(ts) / 1000,
                      toUnixTimestamp64Milli(since) / 1000, idle_seconds, wasted_usd
               FROM gpuledger.alerts WHERE gpu_uuid = {g:String}
               ORDER BY ts, state = 'resolved'""",
            g=gpu,
        )
        return [(s, float(t), float(since), float(i), float(w)) for s, t, since, i, w in found]

    def in_alertmanager(self, gpu: str) -> list[dict[str, Any]]:
        return [a for a in self.alertmanager.alerts() if a["labels"].get("gpu_uuid") == gpu]

    def gpuledger(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpuledger.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def restart_worker(self) -> None:
        self.worker.stop()
        self.worker = WorkerProcess(self.env, self.tmp / "worker.log").start()


@pytest.fixture(scope="module")
def world(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("alerts")
    alertmanager = Alertmanager(tmp / "alertmanager").start()
    webhook = WebhookReceiver()  # not listening yet: the worker must retry until it is
    try:
        (tmp / "store").mkdir()
        store_url = f"chdb://{tmp / 'store'}"
        client = connect(store_url)
        migrate(client)
        sender = Sender(broker.bootstrap)
        price = PriceEntry(
            provider="*",
            region="*",
            gpu_model="H100",
            pricing_model=PricingModel.on_demand,
            usd_per_gpu_hour=4.0,
        )
        sender.send("prices", price.key, price)
        sender.flush()
        env = env_for(
            broker.bootstrap,
            store_url,
            tmp,
            GPULEDGER_ALERTMANAGER_URL=alertmanager.url,
            GPULEDGER_ALERT_WEBHOOK_URL=webhook.url,
            GPULEDGER_ALERT_RETRY_MAX_S="1",
            GPULEDGER_IDLE_UPDATE_EVERY_S="600",
            GPULEDGER_IDLE_RESOLVE_AFTER_S="120",
            GPULEDGER_BUDGET_CHECK_S="1",
            GPULEDGER_SESSION_TIMEOUT_MS="4000",  # quicker group joins after the crash
        )
        worker = WorkerProcess(env, tmp / "worker.log").start()
        world = World(
            tmp, broker.bootstrap, store_url, client, alertmanager, webhook, env, worker, sender
        )
        yield world
        world.worker.stop()
    finally:
        webhook.stop()
        alertmanager.stop()


def settle(world: World, gpu: str, count: int) -> None:
    wait_until(lambda: world.facts(gpu) >= count, what=f"{count} facts of {gpu}")


# -- idle allocated GPUs -----------------------------------------------------------------


def test_an_allocated_gpu_idle_for_601s_raises_one_alert_with_its_wasted_dollars(
    world: World,
) -> None:
    t0 = at(5)
    gpu, job = "GPU-idle-601", "notebook-601"
    world.start_job(job, [gpu], t0, team="applied", project="churn", job_type=JobType.notebook)
    world.send("node-601", [sample(gpu, t0 + s, 0.0, node="node-601") for s in range(601)])
    settle(world, gpu, 601)
    wait_until(lambda: world.alerts(gpu), what="the idle alert")
    time.sleep(0.5)  # anything else these facts raised would be stored by now

    assert world.alerts(gpu) == [
        ("firing", t0 + 600, t0, 600.0, pytest.approx(600 * USD_PER_SECOND, rel=1e-9))
    ]
    # The same alert on the topic, keyed gpu_uuid/job_id.
    on_topic = [
        Alert.model_validate_json(r.value)
        for r in read_topic(world.bootstrap, Topics().alerts, timeout_s=2)
        if r.key == f"{gpu}/{job}".encode()
    ]
    assert [(a.state.value, a.ts, a.wasted_usd) for a in on_topic] == [
        ("firing", t0 + 600, pytest.approx(600 * USD_PER_SECOND, rel=1e-9))
    ]
    # Alertmanager lists it with our labels and the dollars wasted.
    (listed,) = wait_until(lambda: world.in_alertmanager(gpu), what="the alert in Alertmanager")
    assert listed["labels"] == {
        "alertname": "GpuIdleAllocated",
        "severity": "warning",
        "team": "applied",
        "project": "churn",
        "job_id": job,
        "gpu_uuid": gpu,
        "node": "node-601",
    }
    assert listed["annotations"]["wasted_usd"] == "0.67"
    assert "$0.67 wasted" in listed["annotations"]["summary"]
    assert listed["startsAt"].startswith("2026-01-05T00:10:00")


def test_a_gpu_busy_again_at_590s_raises_nothing(world: World) -> None:
    t0 = at(6)
    world.start_job("busy-590", ["GPU-busy-590"], t0, team="vision", project="det",
                    job_type=JobType.training)  # fmt: skip
    world.start_job("control-590", ["GPU-ctl-590"], t0, team="vision", project="det",
                    job_type=JobType.training)  # fmt: skip
    samples = [
        sample("GPU-busy-590", t0 + s, 0.0 if s < 590 else 0.9, node="node-590") for s in range(710)
    ]
    # A control GPU that crosses the line after everything above was costed.
    samples += [
        sample("GPU-ctl-590", t0 + s, 0.0 if s >= 120 else 0.9, node="node-590", index=1)
        for s in range(721)
    ]
    world.send("node-590", samples)
    wait_until(lambda: world.alerts("GPU-ctl-590"), what="the control GPU's alert")
    assert world.facts("GPU-busy-590") == 710
    assert world.alerts("GPU-busy-590") == []


def test_a_job_ending_while_its_gpu_is_idle_resolves_the_alert(world: World) -> None:
    t0 = at(7)
    gpu, job = "GPU-end", "etl-ends"
    world.start_job(
        job, [gpu], t0, team="data", project="warehouse", job_type=JobType.data_processing
    )
    world.send("node-end", [sample(gpu, t0 + s, 0.0, node="node-end") for s in range(700)])
    wait_until(lambda: world.in_alertmanager(gpu), what="the firing alert in Alertmanager")
    world.end_job(job, t0 + 700, state=JobState.failed)
    # The GPU stays idle, now unallocated: nobody's alert.
    world.send("node-end", [sample(gpu, t0 + s, 0.0, node="node-end") for s in range(700, 720)])

    wait_until(lambda: len(world.alerts(gpu)) == 2, what="the resolution")
    assert world.alerts(gpu) == [
        ("firing", t0 + 600, t0, 600.0, pytest.approx(600 * USD_PER_SECOND, rel=1e-9)),
        ("resolved", t0 + 700, t0, 700.0, pytest.approx(700 * USD_PER_SECOND, rel=1e-9)),
    ]
    message = rows(
        world.client,
        "SELECT message FROM gpuledger.alerts WHERE gpu_uuid = {g:String} AND state = 'resolved'",
        g=gpu,
    )[0][0]
    assert "job ended" in message
    # Alertmanager got endsAt: the alert is no longer active there.
    wait_until(lambda: world.in_alertmanager(gpu) == [], what="Alertmanager to drop it")
    firing = rows(world.client, "SELECT gpu_uuid FROM gpuledger.alerts_firing")
    assert (gpu,) not in firing


def test_a_job_with_two_idle_gpus_raises_two_alerts(world: World) -> None:
    t0 = at(8)
    gpus = ["GPU-two-a", "GPU-two-b"]
    world.start_job(
        "train-2gpu", gpus, t0, team="research", project="llm", job_type=JobType.training
    )
    world.send(
        "node-two",
        [
            sample(gpu, t0 + s, 0.0, node="node-two", index=i)
            for i, gpu in enumerate(gpus)
            for s in range(601)
        ],
    )
    for gpu in gpus:
        wait_until(partial(world.alerts, gpu), what=f"the alert of {gpu}")
        assert world.alerts(gpu) == [
            ("firing", t0 + 600, t0, 600.0, pytest.approx(600 * USD_PER_SECOND, rel=1e-9))
        ]
    wait_until(
        lambda: all(world.in_alertmanager(g) for g in gpus), what="both alerts in Alertmanager"
    )


def test_an_idle_unallocated_gpu_raises_nothing(world: World) -> None:
    t0 = at(9)
    world.start_job("control-free", ["GPU-ctl-free"], t0, team="ads", project="ctr",
                    job_type=JobType.training)  # fmt: skip
    samples = [sample("GPU-free", t0 + s, 0.0, node="node-free") for s in range(900)]
    samples += [
        sample("GPU-ctl-free", t0 + s, 0.0 if s >= 300 else 0.9, node="node-free", index=1)
        for s in range(901)
    ]
    world.send("node-free", samples)
    wait_until(lambda: world.alerts("GPU-ctl-free"), what="the control GPU's alert")
    assert world.facts("GPU-free") == 900
    assert world.alerts("GPU-free") == []


def test_the_webhook_gets_the_alert_once_it_is_reachable(world: World) -> None:
    """Down at first: the cost path and the other receivers go on; retries deliver later."""
    t0 = at(11)
    gpu, job = "GPU-hook", "hook-job"
    world.start_job(job, [gpu], t0, team="search", project="index", job_type=JobType.inference)
    world.send("node-hook", [sample(gpu, t0 + s, 0.0, node="node-hook") for s in range(601)])
    settle(world, gpu, 601)
    wait_until(lambda: world.in_alertmanager(gpu), what="the alert in Alertmanager")
    assert not any(b.get("labels", {}).get("gpu_uuid") == gpu for b in world.webhook.bodies)

    world.webhook.start()
    body = wait_until(
        lambda: next(
            (b for b in world.webhook.bodies if b.get("labels", {}).get("gpu_uuid") == gpu), None
        ),
        timeout_s=30,
        what="the webhook POST",
    )
    assert body["status"] == "firing" and body["source"] == "gpuledger"
    assert body["alert"]["kind"] == "idle_allocated_gpu"
    assert body["alert"]["wasted_usd"] == pytest.approx(600 * USD_PER_SECOND, rel=1e-9)
    assert body["labels"]["alertname"] == "GpuIdleAllocated"
    assert body["text"].startswith("[FIRING] Idle allocated GPU GPU-hook on node-hook")


def test_a_job_start_that_arrives_after_its_samples_still_raises_the_alert(
    world: World,
) -> None:
    """The samples are costed as nobody's first; the late job event restates them, and the
    alert fires at the event time it belongs to."""
    t0 = at(12)
    gpu, job = "GPU-late", "late-notebook"
    world.send("node-late", [sample(gpu, t0 + s, 0.0, node="node-late") for s in range(650)])
    settle(world, gpu, 650)
    assert world.alerts(gpu) == []
    world.start_job(job, [gpu], t0, team="applied", project="churn", job_type=JobType.notebook)
    wait_until(lambda: world.alerts(gpu), what="the alert after the restatement")
    assert world.alerts(gpu) == [
        ("firing", t0 + 600, t0, 600.0, pytest.approx(600 * USD_PER_SECOND, rel=1e-9))
    ]
    assert "GPUs rebuilt from their corrected facts (GPU-late)" in world.worker.log()


# -- a replayed day ----------------------------------------------------------------------


def test_a_replayed_day_fires_its_alerts_at_the_event_times_they_happened(
    world: World, tmp_path: Path
) -> None:
    """A day of one node's history, one sample a minute, backfilled with `gpuledger replay`.

    GPU d1 trains all day but idles 02:00-02:30 (fires at 02:10, busy again at 02:30),
    09:00-09:09 (too short), and from 15:00 until its job ends at 15:45. GPU d2's notebook
    idles from 08:00 to 20:00 but for one busy minute at 12:00 (under the two minutes that
    end an alert: no flap), until its job ends. GPU d3 is
    unallocated and idle all day.
    """
    day = at(2)
    minute = 60.0

    def hhmm(h: int, m: int = 0) -> float:
        return day + h * 3600 + m * 60

    jobs = [
        JobEvent(ts=day, job_id="day-train", state=JobState.running, team="research",
                 project="llm", job_type=JobType.training, gpu_uuids=["GPU-d1"], started_at=day),
        JobEvent(ts=hhmm(15, 45), job_id="day-train", state=JobState.succeeded,
                 ended_at=hhmm(15, 45)),
        JobEvent(ts=hhmm(8), job_id="day-notebook", state=JobState.running, team="applied",
                 project="churn", job_type=JobType.notebook, gpu_uuids=["GPU-d2"],
                 started_at=hhmm(8)),
        JobEvent(ts=hhmm(20), job_id="day-notebook", state=JobState.cancelled, ended_at=hhmm(20)),
    ]  # fmt: skip

    def d1(t: float) -> float:
        idle = hhmm(2) <= t < hhmm(2, 30) or hhmm(9) <= t < hhmm(9, 9) or hhmm(15) <= t < hhmm(16)
        return 0.0 if idle else 0.9

    def d2(t: float) -> float:
        return 0.9 if hhmm(12) <= t < hhmm(12, 1) else 0.0

    records = [{"topic": "jobs", "key": j.job_id, "value": j.model_dump(mode="json")} for j in jobs]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    samples_file = tmp_path / "samples.jsonl"
    with samples_file.open("w") as out:
        for i in range(24 * 60):
            t = day + i * minute
            node_batch = batch(
                "node-day",
                [
                    sample("GPU-d1", t, d1(t), node="node-day", interval=minute, index=0),
                    sample("GPU-d2", t, d2(t), node="node-day", interval=minute, index=1),
                    sample("GPU-d3", t, 0.0, node="node-day", interval=minute, index=2),
                ],
            )
            out.write(json.dumps({"topic": "samples", "key": "node-day", "value": node_batch}))
            out.write("\n")

    # A backfill publishes the scheduler's history first, then the telemetry.
    replayed = world.gpuledger("replay", str(jobs_file))
    assert replayed.returncode == 0, replayed.stderr
    wait_until(
        lambda: rows(world.client, "SELECT count() FROM gpuledger.jobs FINAL "
                     "WHERE job_id LIKE 'day-%' AND ended_at IS NOT NULL")[0][0] == 2,
        what="the day's jobs",
    )  # fmt: skip
    replayed = world.gpuledger("replay", str(samples_file))
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1,440 records" in replayed.stdout
    settle(world, "GPU-d3", 1440)
    wait_until(lambda: len(world.alerts("GPU-d2")) >= 2, what="the notebook's resolution")

    def episodes(gpu: str) -> list[tuple[str, float, float, float]]:
        """(state, ts, idle minutes, wasted in idle minutes' cost) of each firing and end."""
        out: list[tuple[str, float, float, float]] = []
        fired: set[float] = set()
        for state, ts, since, idle, wasted in world.alerts(gpu):
            if state == "firing" and since in fired:
                continue  # an update of a firing alert
            fired.add(since)
            out.append((state, ts, idle / minute, round(wasted / (minute * USD_PER_SECOND), 6)))
        return out

    # Alerts are stored after their facts: wait for the last of each GPU's, not only d2's.
    wait_until(lambda: len(episodes("GPU-d1")) >= 4, what="d1's second episode's end")
    assert episodes("GPU-d1") == [
        ("firing", hhmm(2, 10), 10, 10),
        ("resolved", hhmm(2, 30), 30, 30),
        ("firing", hhmm(15, 10), 10, 10),
        ("resolved", hhmm(15, 45), 45, 45),
    ]
    assert episodes("GPU-d2") == [
        ("firing", hhmm(8, 10), 10, 10),
        ("resolved", hhmm(20), 12 * 60 - 1, 12 * 60 - 1),
    ]
    assert world.alerts("GPU-d3") == []
    # While it fires, an update every 10 minutes of event time (the setting), one episode.
    updates = [
        (ts, since) for state, ts, since, _, _ in world.alerts("GPU-d2") if state == "firing"
    ]
    assert updates == [(hhmm(8, 10) + 600 * i, hhmm(8)) for i in range(72)]

    listed = world.gpuledger(
        "alerts", "--since", "2026-01-02T00:00:00Z", "--kind", "idle_allocated_gpu",
        "--format", "json",
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    day_alerts = [a for a in json.loads(listed.stdout) if a["node"] == "node-day"]
    assert sorted((a["gpu_uuid"], a["state"], a["since"]) for a in day_alerts) == [
        ("GPU-d1", "resolved", "2026-01-02T15:00:00Z"),
        ("GPU-d2", "resolved", "2026-01-02T08:00:00Z"),
    ]


# -- budgets -----------------------------------------------------------------------------


def test_a_team_over_its_budget_is_alerted_at_each_line_and_on_its_burn_rate(
    world: World, tmp_path: Path
) -> None:
    budgets = tmp_path / "budgets.csv"
    budgets.write_text(
        "# month,team,project,budget_usd\n"
        "month,team,project,budget_usd\n"
        "2026-01,finance-demo,,1.50\n"
        "*,finance-demo,,1000\n"
        "2026-01,,ledger-x,5000\n"
    )
    loaded = world.gpuledger("budgets", "load", str(budgets))
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded 3 budgets" in loaded.stdout

    t0 = at(28)
    gpu = "GPU-budget"
    world.start_job("spendy", [gpu], t0, team="finance-demo", project="ledger-x",
                    job_type=JobType.training)  # fmt: skip
    # Half an hour at $4.00/h is $2.00: 133 % of the January budget.
    world.send(
        "node-budget",
        [sample(gpu, t0 + 60 * i, 0.9, node="node-budget", interval=60.0) for i in range(30)],
    )
    settle(world, gpu, 30)

    def firing_rules() -> set[str]:
        return {
            r[0]
            for r in rows(
                world.client,
                """SELECT rule FROM gpuledger.alerts WHERE kind = 'budget_burn'
                   AND team = 'finance-demo' AND state = 'firing'""",
            )
        }

    wait_until(
        lambda: firing_rules() == {"mtd_50", "mtd_80", "mtd_100", "burn_rate"},
        what="the budget alerts",
    )
    listed = world.gpuledger("alerts", "--firing", "--kind", "budget_burn", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    mine = [a for a in json.loads(listed.stdout) if a["team"] == "finance-demo"]
    assert sorted(a["rule"] for a in mine) == ["burn_rate", "mtd_100", "mtd_50", "mtd_80"]
    last = next(a for a in mine if a["rule"] == "mtd_100")
    # Worded with the spend of the check that saw the line crossed.
    assert re.fullmatch(
        r"team finance-demo: \$1\.\d\d spent in 2026-01, 1\d\d% of its \$1\.50 budget "
        r"\(crossed 100%\)",
        last["message"],
    ), last["message"]
    # The project's $5,000 is far off: nothing for it.
    assert not [a for a in json.loads(listed.stdout) if a["project"] == "ledger-x"]
    in_am = wait_until(
        lambda: [
            a["labels"]
            for a in world.alertmanager.alerts()
            if a["labels"].get("team") == "finance-demo"
        ]
        if len([a for a in world.alertmanager.alerts()
                if a["labels"].get("team") == "finance-demo"]) == 4 else None,
        what="four budget alerts in Alertmanager",
    )  # fmt: skip
    assert {(lab["alertname"], lab["rule"], lab["severity"], lab["month"]) for lab in in_am} == {
        ("GpuBudgetBurn", "mtd_50", "info", "2026-01"),
        ("GpuBudgetBurn", "mtd_80", "warning", "2026-01"),
        ("GpuBudgetBurn", "mtd_100", "critical", "2026-01"),
        ("GpuBudgetBurn", "burn_rate", "warning", "2026-01"),
    }
    # The alerts topic tells the rules apart too, not only its keys.
    on_topic = {
        (alert.rule, alert.state)
        for alert in (
            Alert.model_validate_json(r.value)
            for r in read_topic(world.bootstrap, Topics().alerts, timeout_s=2)
        )
        if alert.team == "finance-demo"
    }
    assert {("mtd_50", "firing"), ("mtd_100", "firing"), ("burn_rate", "firing")} <= on_topic
    shown = world.gpuledger("budgets", "show", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    status = {(b["team"], b["project"]): b for b in json.loads(shown.stdout)}
    assert status[("finance-demo", "")]["month_to_date_usd"] == pytest.approx(2.0, rel=1e-9)


# -- orphaned GPU memory ------------------------------------------------------------------


def test_a_process_left_on_the_gpu_after_its_job_ended_is_alerted_then_resolved(
    world: World,
) -> None:
    """A training process keeps 6 GiB after its job's end event: 15 minutes later (event
    time) the worker raises orphaned_gpu_memory with the process, the memory and the GPU's
    dollars over those minutes, through the table, the topic and Alertmanager; the process
    gone, it resolves."""
    t0 = at(21)
    gpu, job, node = "GPU-orphan", "orphan-job", "node-o"
    world.start_job(job, [gpu], t0, team="vision", project="det", job_type=JobType.training)

    def held(ts: float, util: float, pid: int | None) -> dict[str, Any]:
        processes = [] if pid is None else [
            ProcessSample(pid=pid, name="train.py", mem_used_bytes=6 * GiB,
                          labels=ProcessLabels(job_id=job))
        ]  # fmt: skip
        return sample_record(
            gpu_sample(gpu, ts, node=node, interval_s=1.0, util_sm=util, util_mem=util,
                       mem_used_bytes=6 * GiB, mem_total_bytes=80 * GiB, processes=processes)
        )  # fmt: skip

    world.send(node, [held(t0 + s, 0.5, 777) for s in range(200)])
    settle(world, gpu, 200)
    world.end_job(job, t0 + 200)
    world.send(node, [held(t0 + s, 0.0, 777) for s in range(200, 1150)])
    settle(world, gpu, 1150)

    def orphan_rows() -> list[tuple[Any, ...]]:
        return rows(
            world.client,
            "SELECT state, toUnixTimestamp64Milli(ts) / 1000, "
            "toUnixTimestamp64Milli(since) / 1000, rule, job_id, team, round(wasted_usd, 6), "
            "message FROM gpuledger.alerts "
            "WHERE kind = 'orphaned_gpu_memory' AND gpu_uuid = {g:String} ORDER BY ts",
            g=gpu,
        )

    (fired,) = wait_until(orphan_rows, what="the orphaned memory alert")
    # Orphaned from its first sample at or past the job's end (t0+200); 900 s later, at
    # t0+1100, it fires: 900 s of an unallocated 4 $/h H100 = $1.00.
    assert fired[:7] == ("firing", t0 + 1100, t0 + 200, "pid 777", job, "vision", 1.0)
    assert (
        "process 777 (train.py) holds 6.0 GiB of GPU memory after job orphan-job ended"
        in (fired[7])
    )
    (listed,) = wait_until(
        lambda: [
            a for a in world.in_alertmanager(gpu)
            if a["labels"]["alertname"] == "GpuOrphanedMemory"
        ],
        what="the orphan alert in Alertmanager",
    )  # fmt: skip
    assert (listed["labels"]["rule"], listed["labels"]["job_id"]) == ("pid 777", job)
    assert listed["annotations"]["wasted_usd"] == "1.00"

    world.send(node, [held(t0 + s, 0.0, None) for s in range(1150, 1160)])
    wait_until(lambda: len(orphan_rows()) == 2, what="the orphan's resolution")
    assert orphan_rows()[1][:2] == ("resolved", t0 + 1150)


# -- the guard, on what the worker decided -------------------------------------------------

GUARD_POLICY = """
[[policy]]
name = "{name}"
idle_minutes = 10
enforce = {enforce}
horizon_hours = 2
match = {{ team = "guarded", scheduler = "slurm" }}
steps = [
  {{ kind = "notify", after_minutes = 0 }},
  {{ kind = "act", after_minutes = 0, action = "requeue" }},
]
"""


def test_the_guard_acts_on_an_idle_gpu_the_worker_alerted_dry_run_then_enforced(
    world: World,
) -> None:
    """Samples through the real broker and worker to a firing idle alert; `gpuledger guard
    --once` records the policy's steps as a dry run, then, enforced, requeues the Slurm job
    (an `scontrol` stand-in on PATH) and tells Alertmanager each step."""
    t0 = at(20)
    gpu, job = "GPU-guarded", "7001"
    world.start_job(job, [gpu], t0, team="guarded", project="p", job_type=JobType.training,
                    labels={"slurm_user": "ada"})  # fmt: skip
    world.send("node-g", [sample(gpu, t0 + s, 0.0, node="node-g") for s in range(700)])
    settle(world, gpu, 700)
    wait_until(lambda: world.alerts(gpu), what="the idle alert")

    calls = world.tmp / "scontrol.log"
    for tool in ("scontrol", "scancel"):
        stand_in = world.tmp / "bin" / tool
        stand_in.parent.mkdir(exist_ok=True)
        stand_in.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        stand_in.chmod(0o755)
    env = {**world.env, "PATH": f"{world.tmp / 'bin'}{os.pathsep}{world.env.get('PATH', '')}"}

    def guard(name: str, enforce: bool) -> subprocess.CompletedProcess[str]:
        policies = world.tmp / f"{name}.toml"
        policies.write_text(GUARD_POLICY.format(name=name, enforce=str(enforce).lower()))
        return subprocess.run(
            [sys.executable, "-m", "gpuledger.cli", "guard", "--once", "--policies", str(policies)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def steps(name: str) -> list[tuple[Any, ...]]:
        return rows(
            world.client,
            "SELECT kind, action, dry_run, outcome, job_id, round(usd_at_stake, 2) "
            "FROM gpuledger.guard_actions WHERE policy = {p:String} ORDER BY step",
            p=name,
        )

    dry = guard("guarded-dry", enforce=False)
    assert dry.returncode == 0, dry.stderr
    # Two hours of a 4 $/h GPU at stake; nothing done.
    assert steps("guarded-dry") == [
        ("notify", "", 1, "recorded", job, 8.0),
        ("act", "requeue", 1, "dry_run", job, 8.0),
    ]
    assert not calls.exists()

    enforced = guard("guarded-enforced", enforce=True)
    assert enforced.returncode == 0, enforced.stderr
    assert steps("guarded-enforced")[-1] == ("act", "requeue", 0, "done", job, 8.0)
    assert calls.read_text() == f"scontrol requeue {job}\n"
    # Run again: the trail says both steps are taken; nothing is repeated.
    assert guard("guarded-enforced", enforce=True).returncode == 0
    assert calls.read_text() == f"scontrol requeue {job}\n"
    noticed = {
        (a["labels"]["policy"], a["labels"]["step"], a["labels"]["dry_run"])
        for a in world.alertmanager.alerts()
        if a["labels"].get("alertname") == "GpuGuardrailStep" and a["labels"]["job_id"] == job
    }
    assert noticed == {
        ("guarded-dry", "notify", "true"),
        ("guarded-dry", "act", "true"),
        ("guarded-enforced", "notify", "false"),
        ("guarded-enforced", "act", "false"),
    }


# -- restarts ----------------------------------------------------------------------------


def test_a_restarted_worker_carries_on_the_episodes_it_had_open(world: World) -> None:
    """One episode not yet fired and one firing when the worker dies: the new worker fires
    the first on time, resolves the second, and repeats neither the alert nor a dollar.
    (The newest day of the module: a restart rebuilds the GPUs of the newest day.)"""
    t0 = at(29)
    world.start_job("restart-a", ["GPU-rs-a"], t0, team="speech", project="asr",
                    job_type=JobType.training)  # fmt: skip
    world.start_job("restart-b", ["GPU-rs-b"], t0, team="speech", project="asr",
                    job_type=JobType.training)  # fmt: skip
    world.send(
        "node-rs",
        [sample("GPU-rs-a", t0 + s, 0.0, node="node-rs") for s in range(400)]
        + [sample("GPU-rs-b", t0 + s, 0.0, node="node-rs", index=1) for s in range(650)],
    )
    settle(world, "GPU-rs-a", 400)
    settle(world, "GPU-rs-b", 650)
    wait_until(lambda: world.alerts("GPU-rs-b"), what="GPU-rs-b's alert")

    world.worker.stop(sig=9)  # a crash: nothing flushed, nothing said
    world.restart_worker()
    world.send(
        "node-rs",
        [sample("GPU-rs-a", t0 + s, 0.0, node="node-rs") for s in range(400, 700)]
        + [sample("GPU-rs-b", t0 + s, 0.8, node="node-rs", index=1) for s in range(650, 780)],
    )
    settle(world, "GPU-rs-a", 700)
    wait_until(lambda: len(world.alerts("GPU-rs-b")) == 2, what="GPU-rs-b's resolution")
    wait_until(lambda: world.alerts("GPU-rs-a"), what="GPU-rs-a's alert")
    time.sleep(0.5)

    assert world.alerts("GPU-rs-a") == [
        ("firing", t0 + 600, t0, 600.0, pytest.approx(600 * USD_PER_SECOND, rel=1e-9))
    ]
    assert world.alerts("GPU-rs-b") == [
        ("firing", t0 + 600, t0, 600.0, pytest.approx(600 * USD_PER_SECOND, rel=1e-9)),
        ("resolved", t0 + 650, t0, 650.0, pytest.approx(650 * USD_PER_SECOND, rel=1e-9)),
    ]
    starts = re.findall(r"idle alerts: (\d+) open episodes \((\d+) firing\)", world.worker.log())
    opened, firing = map(int, starts[-1])  # what the restarted worker found
    assert opened >= 2 and firing >= 1


def test_the_worker_log_has_no_tracebacks(world: World) -> None:
    log = world.worker.log()
    assert "Traceback" not in log, log[-4000:]
    assert os.environ.get("GPULEDGER_ALERTMANAGER_URL") is None  # the test set it for the worker
