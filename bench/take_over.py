"""Take-over: a worker that takes over the samples partitions of a 10,000-GPU fleet whose
last hour of facts is in the store (a crash, a deploy, a rebalance of a running system), and
how long it takes from holding the partitions to its first facts stored: it must learn which
samples the previous owner already stored before it costs any. Beside it, in the same run,
the same take-over over a store with no facts (the baseline: joining, fetching, costing and
the first flush, with nothing to learn).

The hour of history is written straight into `cost_facts` in SQL (3,600 one-second rows per
GPU of the fleet; the rollups fill through their views). The backlog is 10 s of the fleet,
published before the worker starts, and the history covers its first 5 s: the previous
owner stored those samples and died before committing them, so the new owner must find
them stored (50,000 lookups in the store) and cost only the other 5 s. A sample costed twice
is counted and printed (goal 0).
"""

from __future__ import annotations

import time

import orjson

from bench._fleet import Fleet
from bench._report import Figure, show
from bench._rig import (
    Backlog,
    Rig,
    Store,
    fleet_samples,
    median,
    running_system,
    spread,
    watch,
    window,
    workers,
)
from bench.worker_throughput import WORKER_ENV, source_root

SUMMARY = "take-over of a 10,000-GPU fleet's partitions with an hour of facts stored"
GOAL_S = 10.0
BACKLOG_S = 10
OVERLAP_S = 5  # of the backlog, already stored by the previous owner

GPUS_TABLE = "gpuledger.bench_take_over_gpus"
HISTORY_SQL = f"""
INSERT INTO gpuledger.cost_facts
    (ts, sign, node, gpu_uuid, gpu_model, job_id, provider, region, pricing_model,
     duration_s, share, util_sm, mem_used_bytes, power_w, usd_per_gpu_hour, cost_usd,
     idle_cost_usd, allocated, idle, price_missing)
SELECT
    fromUnixTimestamp64Milli(toInt64(({{end:Float64}} - s.number) * 1000), 'UTC'),
    1, 'history', g.gpu_uuid, 'H100', '', 'aws', 'us-east-1', 'on_demand',
    1, 1, 0.5, 0, 300, 4, 4 / 3600, 0, 0, 0, 0
FROM numbers(1, {{seconds:UInt32}}) AS s CROSS JOIN {GPUS_TABLE} AS g
SETTINGS max_insert_block_size = 1000000"""


def fleet_gpus(backlog: Backlog) -> list[str]:
    """The GPU UUIDs of the fleet, from its first tick's batches."""
    gpus: set[str] = set()
    for _, value in backlog.ticks[0].batches:
        gpus.update(s["gpu_uuid"] for s in orjson.loads(value)["samples"])
    return sorted(gpus)


def write_history(store: Store, gpus: list[str], end: float, seconds: int) -> float:
    """`seconds` of one fact per GPU and second, ending at `end`; the seconds it took."""
    started = time.monotonic()
    client = store.client
    client.command(f"CREATE TABLE {GPUS_TABLE} (gpu_uuid String) ENGINE = Memory")
    client.insert(GPUS_TABLE, [[g] for g in gpus], column_names=["gpu_uuid"])
    client.command(HISTORY_SQL, parameters={"end": end, "seconds": seconds})
    return time.monotonic() - started


def measure(rig: Rig, backlog: Backlog, prefix: str, history_s: int) -> tuple[float, float, int]:
    """(partitions held -> first facts stored, s; seconds spent writing the history; samples
    of the overlap costed again)."""
    store, _ = running_system(
        rig, backlog, prefix, "worker", source_root=source_root(), samples=False
    )
    wrote = 0.0
    overlap = 0
    t0 = backlog.fleet.t0
    if history_s:
        wrote = write_history(store, fleet_gpus(backlog), t0 + OVERLAP_S, history_s)
        overlap = sum(
            fleet_samples(v) for tick in backlog.ticks[:OVERLAP_S] for _, v in tick.batches
        )
    published = backlog.publish_samples(rig.broker.bootstrap, rig.add_topics(prefix, 1))
    with workers(
        1,
        rig,
        store,
        prefix=prefix,
        group_id="worker",
        source_root=source_root(),
        extra_env=WORKER_ENV,
    ) as (worker,):
        points = watch(
            lambda: store.count("SELECT count() FROM gpuledger.samples_raw"),
            published.samples - overlap,
            [worker.pid, store.pid],
            timeout_s=900,
            started=worker.assigned,
            alive=lambda: worker.proc.poll() is None,
        )
    twice = store.count(
        "SELECT count() FROM gpuledger.cost_facts WHERE node != 'history' AND "
        f"ts < fromUnixTimestamp64Milli({round((t0 + OVERLAP_S) * 1000)}, 'UTC')"
    )
    return window(points).startup_s, wrote, twice if history_s else 0


def run(quick: bool = False) -> None:
    nodes, history_s, rounds = (125, 600, 1) if quick else (1250, 3600, 2)
    backlog = Backlog.of(Fleet(nodes), BACKLOG_S)
    gpus = backlog.fleet.gpus
    stored: list[float] = []
    empty: list[float] = []
    twice = 0
    with Rig() as rig:
        for r in range(rounds):
            took, wrote, again = measure(rig, backlog, f"take{r}h.", history_s)
            stored.append(took)
            twice += again
            empty.append(measure(rig, backlog, f"take{r}e.", 0)[0])
            print(
                f"round {r + 1}: {took:.1f} s with {gpus * history_s:,} facts stored "
                f"(written in {wrote:.0f} s), {empty[-1]:.1f} s with none; "
                f"{again:,} stored samples costed again",
                flush=True,
            )
    show(
        f"Take-over: {gpus:,} GPUs, {history_s:,} s of facts stored, the first {OVERLAP_S} s "
        f"of a {BACKLOG_S} s backlog among them, {rounds} round(s)",
        [
            Figure(
                "partitions held -> first facts stored, s",
                spread(stored, ".1f"),
                f"<= {GOAL_S:.0f}",
                median(stored) <= GOAL_S,
                spread(empty, ".1f"),
                f"{median(stored) / median(empty):.2f}",
                "baseline: the same take-over with no facts stored",
            ),
            Figure(
                "samples the previous owner stored, costed again",
                f"{twice:,}",
                "0",
                twice == 0,
            ),
        ],
        [
            "The worker learns the newest fact in the store (one figure) and looks up only",
            "samples no later than it in the store, a few hundred GPUs per query.",
        ],
    )
