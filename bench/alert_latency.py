"""Idle alert latency: wall time from the sample that crosses the idle threshold
being published to the alert visible in Alertmanager, on a live stream at 1 s sampling.

A `gpuledger worker` (embedded broker, fresh embedded store) delivers to a real Alertmanager
(Debian's `prometheus-alertmanager`, started here on a free port). This process plays the
agents of a few nodes: every second it publishes one `SampleBatch` per node whose samples
cover the second just past (`ts = now - 1`, as the agent stamps them). The GPUs of one job
work, then go idle one after another, a couple of seconds apart; each crosses the threshold
(`GPULEDGER_IDLE_ALERT_AFTER_S`, short here: the latency does not depend on it) with the
sample that ends `after_s` after its first idle one. The figures:

- publish -> Alertmanager: from the crossing sample's batch acknowledged by the broker to
  the first `GET /api/v2/alerts` that lists the GPU's alert (polled every 50 ms);
- threshold -> Alertmanager: from the threshold moment itself (the end of the crossing
  sample, which on a live stream is wall time) to the same; goal 5 s;
- baseline, in the same run: publish -> the crossing sample's fact row visible in the
  store. The alert cannot come before its fact; the ratio says what alerting adds.

The worker holds a sample for its grace (1 s of event time: the next second's batch releases
it), so about a second of the figure is by design.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._report import Figure, show
from bench._rig import Rig, Worker, median, producer, publish_prices, spread, wait_for
from gpuledger.broker import free_port
from gpuledger.children import die_with_parent
from gpuledger.schema.messages import JobEvent, JobState, JobType

SUMMARY = "idle alert: crossing sample published -> visible in Alertmanager, live at 1 s"
GOAL_S = 60.0
GOAL_LIVE_S = 5.0
H100 = "NVIDIA H100 80GB HBM3"


class Alertmanager:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Alertmanager:
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if binary is None:
            raise SystemExit(
                "alert_latency needs Alertmanager: apt-get update && apt-get install -y "
                "prometheus-alertmanager"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "am.yml"
        config.write_text('route: {receiver: "null"}\nreceivers: [{name: "null"}]\n')
        log = (self.folder / "am.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.path={self.folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip
        wait_for(self.ready, 20, "Alertmanager to start")
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def gpus_alerted(self) -> set[str]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=2) as reply:
            alerts: list[dict[str, Any]] = json.load(reply)
        return {a["labels"].get("gpu_uuid", "") for a in alerts}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@dataclass
class Crossing:
    gpu: str
    node: str
    idle_from: float
    threshold: float  # the end of the crossing sample (event time = wall time, live)
    published: float | None = None
    fact_seen: float | None = None
    alert_seen: float | None = None


@dataclass
class Watcher:
    """Polls Alertmanager and the store every 50 ms for the crossings not yet seen."""

    alertmanager: Alertmanager
    store: Any
    crossings: list[Crossing]
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            waiting = [c for c in self.crossings if c.published is not None]
            if any(c.alert_seen is None for c in waiting):
                alerted = self.alertmanager.gpus_alerted()
                for c in waiting:
                    if c.alert_seen is None and c.gpu in alerted:
                        c.alert_seen = now
            for c in waiting:
                if c.fact_seen is None and self._fact(c):
                    c.fact_seen = time.time()
            time.sleep(0.05)

    def _fact(self, c: Crossing) -> bool:
        found = self.store.query(
            """SELECT count() FROM gpuledger.cost_facts
               WHERE gpu_uuid = {g:String}
                 AND ts = fromUnixTimestamp64Milli({t:Int64}, 'UTC')""",
            parameters={"g": c.gpu, "t": round((c.threshold - 1.0) * 1000)},
        ).result_rows
        return bool(found[0][0])


def sample(gpu: str, index: int, node: str, ts: float, util: float) -> dict[str, Any]:
    return {
        "v": 1, "ts": ts, "node": node, "gpu_uuid": gpu, "gpu_index": index, "gpu_name": H100,
        "interval_s": 1.0, "util_sm": util, "util_mem": util, "mem_used_bytes": 20 << 30,
        "mem_total_bytes": 80 << 30, "power_w": 100.0 + 500 * util, "power_limit_w": 700.0,
        "temp_c": 50.0, "processes": [],
    }  # fmt: skip


def run(quick: bool = False) -> None:
    nodes, gpus_per_node, after_s, stagger_s = (2, 2, 5, 2) if quick else (4, 2, 10, 2)
    with Rig(prefix="bench.alerts.") as rig:
        tmp = Path(tempfile.mkdtemp(prefix="alert-latency-", dir=rig.tmp))
        alertmanager = Alertmanager(tmp / "alertmanager").start()
        try:
            store = rig.new_store()
            publish_prices(rig.broker.bootstrap, rig.topics)
            worker = Worker(
                rig.broker.bootstrap,
                store,
                tmp / "worker",
                prefix=rig.prefix,
                group_id="alert-latency",
                extra_env={
                    "GPULEDGER_ALERTMANAGER_URL": alertmanager.url,
                    "GPULEDGER_IDLE_ALERT_AFTER_S": str(after_s),
                },
            )
            try:
                worker.wait_ready()
                crossings = live_run(rig, store.client, alertmanager, worker, nodes,
                                     gpus_per_node, after_s, stagger_s)  # fmt: skip
            finally:
                worker.stop()
        finally:
            alertmanager.stop()
    report(crossings, after_s)


def live_run(
    rig: Rig,
    store: Any,
    alertmanager: Alertmanager,
    worker: Worker,
    nodes: int,
    gpus_per_node: int,
    after_s: float,
    stagger_s: float,
) -> list[Crossing]:
    out = producer(rig.broker.bootstrap)
    topics = rig.topics
    start = float(int(time.time()) + 1)
    warmup = 8.0  # the worker's samples consumer joins its group meanwhile
    layout = [
        (f"GPU-lat-{n}-{i}", i, f"node-lat-{n}") for n in range(nodes) for i in range(gpus_per_node)
    ]
    job = JobEvent(ts=start, job_id="latency-job", state=JobState.running, team="sre",
                   project="alert-latency", job_type=JobType.notebook,
                   gpu_uuids=[g for g, _, _ in layout], started_at=start - 60)  # fmt: skip
    out.send(topics.jobs, key=b"latency-job", value=job.model_dump_json().encode())
    out.flush()
    crossings = []
    for k, (gpu, _, node) in enumerate(layout):
        idle_from = start + warmup + k * stagger_s
        crossings.append(Crossing(gpu, node, idle_from, idle_from + after_s))
    by_gpu = {c.gpu: c for c in crossings}
    watcher = Watcher(alertmanager, store, crossings)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    end = max(c.threshold for c in crossings) + 6.0
    tick = start
    try:
        while tick <= end:
            time.sleep(max(0.0, tick - time.time()))
            ts = tick - 1.0  # the second just past, as the agent stamps it
            crossing_now = []
            for n in range(nodes):
                node = f"node-lat-{n}"
                samples = []
                for gpu, index, gpu_node in layout:
                    if gpu_node != node:
                        continue
                    idle = ts >= by_gpu[gpu].idle_from
                    samples.append(sample(gpu, index, node, ts, 0.0 if idle else 0.85))
                    if ts + 1.0 == by_gpu[gpu].threshold:
                        crossing_now.append(by_gpu[gpu])
                value = json.dumps({"v": 1, "node": node, "samples": samples}).encode()
                out.send(topics.samples, key=node.encode(), value=value)
            out.flush()
            acked = time.time()
            for c in crossing_now:
                c.published = acked
            tick += 1.0
        wait_for(
            lambda: all(c.alert_seen and c.fact_seen for c in crossings),
            GOAL_S,
            "every alert in Alertmanager",
            worker,
        )
    finally:
        watcher.stop.set()
        thread.join(timeout=5)
        out.close()
    return crossings


def report(crossings: list[Crossing], after_s: float) -> None:
    seen = [c for c in crossings if c.published and c.alert_seen and c.fact_seen]
    from_publish = [c.alert_seen - c.published for c in seen]  # type: ignore[operator]
    from_threshold = [c.alert_seen - c.threshold for c in seen]  # type: ignore[operator]
    fact = [c.fact_seen - c.published for c in seen]  # type: ignore[operator]
    worst = max(from_publish)
    worst_live = max(from_threshold)
    ratio = median(from_publish) / median(fact) if median(fact) > 0 else float("nan")
    show(
        f"Idle alert latency: {len(seen)} GPUs going idle on a live 1 s stream "
        f"(threshold {after_s:g} s here)",
        [
            Figure(
                "publish -> Alertmanager (s)",
                spread(from_publish, ".2f"),
                f"<= {GOAL_S:g} s",
                worst <= GOAL_S,
                baseline=f"fact visible: {spread(fact, '.2f')}",
                ratio=f"{ratio:.2f}x the fact",
                note=f"worst {worst:.2f} s = {worst / GOAL_S:.1%} of the goal",
            ),
            Figure(
                "threshold moment -> Alertmanager (s)",
                spread(from_threshold, ".2f"),
                f"<= {GOAL_LIVE_S:g} s",
                worst_live <= GOAL_LIVE_S,
                note=f"worst {worst_live:.2f} s = {worst_live / GOAL_LIVE_S:.0%} of the goal",
            ),
        ],
        notes=[
            "publish = the crossing sample's batch acknowledged by the broker (acks=all); "
            "visible = the first GET /api/v2/alerts (every 50 ms) that lists it.",
            "About 1 s of it is the worker's grace (1 s of event time: the next batch "
            "releases the sample).",
        ],
    )


if __name__ == "__main__":
    run()
