"""Scale-out: the worker throughput of `bench worker_throughput` with
two `gpuledger worker` processes in one consumer group on a 4-partition samples topic, next
to one worker on the same topic in the same run; the ratio two/one.

This machine has 2 cores, which the two workers share with the store and the broker: the
ratio says how much of a second core a second worker turns into samples, not what a cluster
of worker machines does (docs/SCALING.md extrapolates that). The clock starts once every
worker has its partitions (a rebalance is start-up, not throughput).
"""

from __future__ import annotations

from bench._fleet import Fleet
from bench._report import Figure, show
from bench._rig import Backlog, Rig, Window, median, running_system, spread, watch, window, workers
from bench.worker_throughput import WORKER_ENV, source_root

SUMMARY = "throughput of two workers in one group vs one, 4-partition topic, 2 cores"
PARTITIONS = 4


def measure(rig: Rig, backlog: Backlog, prefix: str, count: int) -> Window:
    store, published = running_system(
        rig,
        backlog,
        prefix,
        "workers",
        partitions=PARTITIONS,
        source_root=source_root(),
        extra_env=WORKER_ENV,
    )
    with workers(
        count,
        rig,
        store,
        prefix=prefix,
        group_id="workers",
        source_root=source_root(),
        extra_env=WORKER_ENV,
    ) as started:
        for worker in started:
            worker.wait_ready()
        points = watch(
            lambda: store.count("SELECT count() FROM gpuledger.samples_raw"),
            published.samples,
            [w.pid for w in started] + [store.pid],
            timeout_s=900,
            started=lambda: all(w.assigned() for w in started),
            alive=lambda: all(w.proc.poll() is None for w in started),
        )
    return window(points)


def run(quick: bool = False) -> None:
    nodes, ticks, rounds = (250, 20, 1) if quick else (1250, 60, 2)
    backlog = Backlog.of(Fleet(nodes), ticks)
    one: list[Window] = []
    two: list[Window] = []
    with Rig() as rig:
        for r in range(rounds):
            one.append(measure(rig, backlog, f"one{r}.", 1))
            two.append(measure(rig, backlog, f"two{r}.", 2))
            print(
                f"round {r + 1}: one worker {one[-1].rate:,.0f}/s, two {two[-1].rate:,.0f}/s "
                f"({two[-1].rate / one[-1].rate:.2f}x)",
                flush=True,
            )
    ratios = [t.rate / o.rate for o, t in zip(one, two, strict=True)]
    per_cpu_two = [t.rows / (t.cpu[0] + t.cpu[1]) for t in two]
    figures = [
        Figure(
            "two workers / one, samples/s (wall clock)",
            f"{median(ratios):.2f}",
            "report (2 cores)",
            None,
            spread([o.rate for o in one]),
            " / ".join(f"{x:.2f}" for x in ratios),
            f"two: {spread([t.rate for t in two])} samples/s",
        ),
        Figure(
            "samples per worker CPU-s, two workers",
            spread(per_cpu_two),
            "",
            None,
            spread([o.per_cpu_second() for o in one]),
            f"{median(per_cpu_two) / median([o.per_cpu_second() for o in one]):.2f}",
            "baseline: one worker; below 1 = the workers wait for the cores",
        ),
        Figure(
            "machine busy, cores",
            spread([t.machine_cpu / t.seconds for t in two], ".2f"),
            "",
            None,
            spread([o.machine_cpu / o.seconds for o in one], ".2f"),
            "",
            "of 2 (two workers / one)",
        ),
    ]
    show(
        f"Scale-out: {PARTITIONS} partitions, {backlog.samples:,} samples of "
        f"{backlog.fleet.gpus:,} GPUs, {rounds} round(s)",
        figures,
        ["Clock from every worker holding its partitions to the last row visible."],
    )
