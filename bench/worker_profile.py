"""Where the worker's CPU goes: py-spy on a `gpuledger worker` consuming a backlog of the
10,000-GPU fleet, from `worker ready` to the last row stored, sampling the thread that holds
the GIL (the Python CPU, which bounds the worker). Prints the top frames by own
time (where the CPU is) and the top functions by total time (what the CPU is spent for).

Needs `py-spy` (pip install py-spy==0.4.3) beside the Python that runs the benchmark. Set
GPULEDGER_BENCH_SOURCE to profile another tree (an export of an older commit).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench._fleet import Fleet
from bench._report import console
from bench._rig import Backlog, Rig, running_system, watch, window, workers
from bench.worker_throughput import WORKER_ENV, source_root
from gpuledger.children import die_with_parent

SUMMARY = "py-spy profile of the worker on a backlog: top frames by own and by total time"
TOP = 15
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed beside this Python: pip install py-spy==0.4.3")
    return found


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = os.path.relpath(path, source_root()) if path.startswith("/") else path
    return f"{match['func']} ({path})"


def summarize(raw: str) -> tuple[Counter[str], Counter[str], int]:
    """(own samples per frame, total samples per function, all samples) of py-spy raw output."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    return own, total, samples


def run(quick: bool = False) -> None:
    nodes, ticks = (250, 20) if quick else (1250, 40)
    fleet = Fleet(nodes)
    out_dir = Path(os.environ.get("GPULEDGER_BENCH_OUT", "."))
    with Rig() as rig:
        store, published = running_system(
            rig, Backlog.of(fleet, ticks), "prof.", "profiled", source_root=source_root(),
            extra_env=WORKER_ENV,
        )  # fmt: skip
        raw_path = rig.tmp / "profile.txt"
        with workers(
            1,
            rig,
            store,
            prefix="prof.",
            group_id="profiled",
            source_root=source_root(),
            extra_env=WORKER_ENV,
        ) as (worker,):
            worker.wait_ready()
            spy = subprocess.Popen(
                [py_spy(), "record", "--pid", str(worker.pid), "--rate", "250",
                 "--format", "raw", "--output", str(raw_path), "--nonblocking", "--gil"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )  # fmt: skip
            points = watch(
                lambda: store.count("SELECT count() FROM gpuledger.samples_raw"),
                published.samples,
                [worker.pid],
                timeout_s=900,
            )
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
    run_window = window(points)
    own, total, samples = summarize(raw_path.read_text())
    keep = out_dir / "worker-profile.txt"
    if os.environ.get("GPULEDGER_BENCH_OUT"):
        shutil.copy(raw_path, keep)
    console.print(
        f"Profile of the worker from {source_root()}: {published.samples:,} samples in "
        f"{run_window.seconds:.1f} s ({run_window.per_cpu_second():,.0f} samples per CPU-s), "
        f"{samples:,} stack samples at 250 Hz of the thread holding the GIL",
        highlight=False,
    )
    ours = Counter({n: c for n, c in total.items() if _is_pipeline(n)})
    for title, counter in (("own time", own), ("total time, the worker's own code", ours)):
        console.print(f"\nTop {TOP} by {title}:", highlight=False)
        for name, count in counter.most_common(TOP):
            console.print(f"  {100 * count / samples:5.1f} %  {name}", highlight=False)


def _is_pipeline(name: str) -> bool:
    """A function of the stream worker (not the CLI, the event loop or a library); its
    modules are named through the package (`gpuledger/streams/...`) or from the root."""
    path = name.rpartition("(")[2].removeprefix("gpuledger/")
    return path.startswith(("streams/", "ledger/", "schema/", "store/"))
