"""End-to-end latency: from the moment a sample is complete
(`ts + interval_s`) to its fact rows visible to a query through the store, at 10,000 samples/s
(1,250 nodes of 8 GPUs, one `SampleBatch` per node every second, in a burst at each whole
second as agents aligned to the wall clock send them) for 60 s.

A restarted `gpuledger worker` with the default settings (1 s grace) consumes the live topic;
this process plays the agents (kafka-python, lz4, as agents/publisher.py) and polls the store
every 100 ms for the fact rows of each second. A row's latency is the start of the first poll
that sees it minus the end of its sample's interval, so it is over-stated by up to the poll
interval. Agents, broker, store and worker share this machine's 2 cores.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

from bench._fleet import Fleet
from bench._report import Figure, show
from bench._rig import (
    Backlog,
    Rig,
    Store,
    cpu_seconds,
    machine_cpu_seconds,
    producer,
    running_system,
)
from bench._rig import workers as start_workers
from bench.worker_throughput import source_root

SUMMARY = "p50/p99 from a sample's end to its facts visible in the store, 10,000 samples/s"
GOAL_P50_S = 2.0
GOAL_P99_S = 2.0
POLL_S = 0.1


@dataclass
class Agents:
    ticks: int = 0
    late_s: float = 0.0  # how far behind its second the slowest tick's burst finished


def percentile(values: list[tuple[float, int]], q: float) -> float:
    """The q-quantile of weighted values (value, weight)."""
    ordered = sorted(values)
    total = sum(w for _, w in ordered)
    seen = 0
    for value, weight in ordered:
        seen += weight
        if seen >= q * total:
            return value
    return ordered[-1][0] if ordered else float("nan")


def run(quick: bool = False) -> None:
    nodes, seconds = (1250, 15) if quick else (1250, 60)
    # Scenario time is wall time: the fleet starts a few seconds from now.
    start = float(int(time.time()) + 75)
    fleet = Fleet(nodes, t0=start)
    with Rig() as rig:
        backlog = Backlog.of(fleet, seconds)  # generated ahead; published on the clock
        # Metadata first (a running system's jobs, prices, nodes), then the live samples.
        topics_prefix = "live."
        store, _ = running_system(
            rig, backlog, topics_prefix, "worker", source_root=source_root(), samples=False
        )
        visible: Counter[int] = Counter()
        latencies: list[tuple[float, int]] = []
        with start_workers(
            1, rig, store, prefix=topics_prefix, group_id="worker", source_root=source_root()
        ) as (worker,):
            worker.wait_ready()
            if time.time() > start - 2:
                raise RuntimeError("set-up took too long: the fleet's start is already past")
            out = producer(rig.broker.bootstrap)
            stats = Agents()
            topic = f"{topics_prefix}samples"
            sent_samples = 0

            def agents() -> None:
                for tick in backlog.ticks:
                    time.sleep(max(0.0, tick.now - time.time()))
                    for key, value in tick.batches:
                        out.send(topic, key=key, value=value)
                    out.flush()
                    stats.ticks += 1
                    stats.late_s = max(stats.late_s, time.time() - tick.now)

            for tick in backlog.ticks:
                sent_samples += sum(v.count(b'"gpu_uuid"') for _, v in tick.batches)
            cpu0 = (cpu_seconds(worker.pid), cpu_seconds(store.pid), machine_cpu_seconds())
            wall0 = time.monotonic()
            thread = threading.Thread(target=agents, name="agents", daemon=True)
            thread.start()
            deadline = start + seconds + 60
            since_ms = round(start * 1000) - 1000
            done = False
            while time.time() < deadline and not done:
                asked = time.time()
                result = store.client.query(
                    """SELECT toUnixTimestamp64Milli(ts), count() FROM gpuledger.cost_facts
                       WHERE ts >= fromUnixTimestamp64Milli({t:Int64}, 'UTC')
                       GROUP BY ts""",
                    parameters={"t": since_ms},
                )
                for ts_ms, rows in result.result_rows:
                    new = int(rows) - visible[ts_ms]
                    if new > 0:
                        visible[ts_ms] += new
                        # The sample covers [ts, ts + 1 s): complete at ts + 1.
                        latencies.append((asked - (ts_ms / 1000 + fleet.interval_s), new))
                done = not thread.is_alive() and _all_samples_in(store, sent_samples)
                time.sleep(max(0.0, POLL_S - (time.time() - asked)))
            thread.join(timeout=5)
            out.close()
            wall = time.monotonic() - wall0
            cpu1 = (cpu_seconds(worker.pid), cpu_seconds(store.pid), machine_cpu_seconds())
    p50 = percentile(latencies, 0.50)
    p99 = percentile(latencies, 0.99)
    worst = max((v for v, _ in latencies), default=float("nan"))
    rows = sum(w for _, w in latencies)
    figures = [
        Figure("p50 latency, s", f"{p50:.2f}", f"<= {GOAL_P50_S}", p50 <= GOAL_P50_S,
               "", "", "grace of 1 s event time included"),
        Figure("p99 latency, s", f"{p99:.2f}", f"<= {GOAL_P99_S}", p99 <= GOAL_P99_S,
               "", "", f"worst row {worst:.2f} s"),
        Figure("rate sustained, samples/s", f"{sent_samples / seconds:,.0f}", ">= 10,000",
               stats.ticks == seconds, "", "",
               f"{seconds} s; agents' slowest burst ended {stats.late_s:.2f} s after its second"),
        Figure("worker CPU at this rate, cores", f"{(cpu1[0] - cpu0[0]) / wall:.2f}", "", None,
               "", "", f"store {(cpu1[1] - cpu0[1]) / wall:.2f}, machine "
               f"{(cpu1[2] - cpu0[2]) / wall:.2f} of 2"),
    ]  # fmt: skip
    show(
        f"End-to-end latency: {nodes:,} nodes x 8 GPUs, {seconds} s live, {rows:,} fact rows",
        figures,
        [
            f"Latency = first poll (every {POLL_S:.1f} s) that sees a row - end of its sample's "
            "interval: over-stated by up to the poll interval.",
            "The agents (this process), broker, store and worker share 2 cores.",
        ],
    )


def _all_samples_in(store: Store, expected: int) -> bool:
    return store.count("SELECT count() FROM gpuledger.samples_raw") >= expected
