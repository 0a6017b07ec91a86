"""Worker throughput: GPU samples per second per core, from the samples
topic to fact rows in the store, next to the bare loop of this machine measured in the same
run on the same messages and the same store.

Each round sets up a running system (fresh topics and store, metadata published and known, a
worker that ran once and stopped: `bench._rig.running_system`), publishes a backlog of a
10,000-GPU fleet (1,250 nodes of 8 GPUs, one `SampleBatch` per node and second, as the agent
sends them), then lets the bare loop (`bench/_bare.py`), a restarted `gpuledger worker` and the
floor (`bench/_floor.py`: the worker's decoding and writes without its cost model, on a store of
its own) each consume all of it. Rates are
taken from the moment the consumer holds its partitions (`worker ready`; the group join is
not throughput) to the last row visible in the store; "per core" divides by the CPU seconds of
the consuming process only (the store and the broker run in their own processes
and are reported beside it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import _bare
from bench._fleet import Fleet
from bench._report import Figure, show
from bench._rig import (
    ROOT,
    Backlog,
    Rig,
    Store,
    Window,
    median,
    running_system,
    spread,
    watch,
    window,
    workers,
)
from gpuledger.children import die_with_parent
from gpuledger.schema.topics import Topics

SUMMARY = "samples/s per core, topic -> facts in the store, vs the bare aiokafka loop"
GOAL_PER_CORE = 50_000
GOAL_RATIO = 0.5
# The last tick of a backlog has no later event time to release it: it waits this long (wall
# clock) instead of the default 3 s, so that the tail does not dominate a 10-second run.
WORKER_ENV = {"GPULEDGER_MAX_HOLD_WALL_S": "0.5"}


def source_root() -> Path:
    """The tree whose worker runs (GPULEDGER_BENCH_SOURCE: e.g. an export of an older commit)."""
    return Path(os.environ.get("GPULEDGER_BENCH_SOURCE") or ROOT).resolve()


def run_bare(rig: Rig, store: Store, topic: str, expected: int, group: str) -> Window:
    _bare.prepare(store.url)
    args = [rig.broker.bootstrap, store.url, topic, group]
    return run_loop(rig, store, "bench._bare", args, f"SELECT count() FROM {_bare.TABLE}", expected)


def run_floor(rig: Rig, prefix: str, expected: int, group: str) -> Window:
    """The floor (`bench/_floor.py`) on a store of its own: the worker's store has these samples."""
    store = rig.new_store()
    args = [rig.broker.bootstrap, store.url, prefix, group]
    count = "SELECT count() FROM gpuledger.samples_raw"
    return run_loop(rig, store, "bench._floor", args, count, expected)


def run_loop(
    rig: Rig, store: Store, module: str, args: list[str], count: str, expected: int
) -> Window:
    """A consuming loop of bench/ in its own process, timed from its "assigned" line to the
    last of `expected` rows that `count` counts."""
    out = rig.tmp / f"{module}-{args[-1]}.out"
    with out.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            stdout=handle,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        points = watch(
            lambda: store.count(count),
            expected,
            [proc.pid, store.pid],
            timeout_s=600,
            started=lambda: b"assigned" in out.read_bytes(),
            alive=lambda: proc.poll() is None,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return window(points)


def run_workers(
    rig: Rig, store: Store, prefix: str, expected: int, group: str, count: int = 1
) -> Window:
    with workers(
        count,
        rig,
        store,
        prefix=prefix,
        group_id=group,
        source_root=source_root(),
        extra_env=WORKER_ENV,
    ) as started:
        for worker in started:
            worker.wait_ready()
        points = watch(
            lambda: store.count("SELECT count() FROM gpuledger.samples_raw"),
            expected,
            [w.pid for w in started] + [store.pid],
            timeout_s=900,
            alive=lambda: all(w.proc.poll() is None for w in started),
        )
    return window(points)


def run(quick: bool = False) -> None:
    nodes, ticks, rounds = (125, 20, 1) if quick else (1250, 40, 3)
    backlog = Backlog.of(Fleet(nodes), ticks)
    expected = backlog.samples
    bare: list[Window] = []
    worker: list[Window] = []
    floor: list[Window] = []
    with Rig() as rig:
        for r in range(rounds):
            prefix = f"tput{r}."
            store, published = running_system(
                rig, backlog, prefix, "worker", source_root=source_root(), extra_env=WORKER_ENV
            )
            if r == 0:
                print(
                    f"{published.messages:,} SampleBatch messages per round ({expected:,} "
                    f"samples of {backlog.fleet.gpus:,} GPUs, "
                    f"{published.bytes / published.messages:,.0f} bytes each)",
                    flush=True,
                )
            bare.append(run_bare(rig, store, Topics(prefix).samples, expected, f"bare-{r}"))
            worker.append(run_workers(rig, store, prefix, expected, "worker"))
            floor.append(run_floor(rig, prefix, expected, f"floor-{r}"))
            print(
                f"round {r + 1}: bare {bare[-1].rate:,.0f}/s "
                f"({bare[-1].per_cpu_second():,.0f} per CPU-s), worker {worker[-1].rate:,.0f}/s "
                f"({worker[-1].per_cpu_second():,.0f} per CPU-s), floor {floor[-1].rate:,.0f}/s "
                f"({floor[-1].per_cpu_second():,.0f} per CPU-s)",
                flush=True,
            )
    ratios = [w.rate / b.rate for w, b in zip(worker, bare, strict=True)]
    per_core = [w.per_cpu_second() for w in worker]
    bare_per_core = [b.per_cpu_second() for b in bare]
    floor_per_core = [f.per_cpu_second() for f in floor]
    figures = [
        Figure(
            "worker samples/s per core (samples / worker CPU-s)",
            spread(per_core),
            f">= {GOAL_PER_CORE:,}",
            median(per_core) >= GOAL_PER_CORE,
            spread(bare_per_core),
            f"{median(per_core) / median(bare_per_core):.2f}",
            "baseline: the bare loop's samples per CPU-s",
        ),
        Figure(
            "the floor: samples/s per core with no cost model (bench/_floor.py)",
            spread(floor_per_core),
            f">= {GOAL_RATIO} x bare",
            median(floor_per_core) >= GOAL_RATIO * median(bare_per_core),
            spread(bare_per_core),
            f"{median(floor_per_core) / median(bare_per_core):.2f}",
            "decode, both inserts, the feed, as the worker does them: a ceiling for it",
        ),
        Figure(
            "worker samples/s, wall clock",
            spread([w.rate for w in worker]),
            f">= {GOAL_RATIO} x bare",
            median(ratios) >= GOAL_RATIO,
            spread([b.rate for b in bare]),
            " / ".join(f"{x:.2f}" for x in ratios),
            "ratio per round; 2 cores shared with the store and broker",
        ),
        Figure(
            "of which partitions held -> first row visible, s",
            spread([w.startup_s for w in worker], ".1f"),
            "",
            None,
            spread([b.startup_s for b in bare], ".1f"),
            "",
            "take-over, first fetches and first flush (in the rates)",
        ),
        Figure(
            "store CPU per sample, µs",
            spread([1e6 * w.cpu[1] / w.rows for w in worker], ",.1f"),
            "",
            None,
            spread([1e6 * b.cpu[1] / b.rows for b in bare], ",.1f"),
            "",
            "worker: facts + raw samples + rollups; bare: one plain row",
        ),
        Figure(
            "machine busy during the run, cores",
            spread([w.machine_cpu / w.seconds for w in worker], ".2f"),
            "",
            None,
            spread([b.machine_cpu / b.seconds for b in bare], ".2f"),
            "",
            "of 2; other engineers' tests share the machine",
        ),
    ]
    show(
        f"Worker throughput: {nodes:,} nodes x 8 GPUs, {ticks} s backlog "
        f"({expected:,} samples), {rounds} round(s), worker from {source_root()}",
        figures,
        [
            "Rates from partitions held to the last row visible; 'per core' = samples / CPU",
            "seconds of the consuming process. The spread (min-max) across rounds is this",
            "machine's noise. Worker: GPULEDGER_MAX_HOLD_WALL_S=0.5 (the backlog's last tick).",
        ],
    )
