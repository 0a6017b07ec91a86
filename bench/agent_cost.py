"""Agent cost: CPU as a fraction of one core and RSS of `gpuledger agent` reading a
node of 8 GPUs with 20 processes each at 1 Hz, against the goal (<= 0.3 % of a core, <= 50 MB).

The agent runs as on a GPU node: the real NVML path (unchanged pynvml) over the simulated
`libnvidia-ml.so.1` on LD_LIBRARY_PATH, fed live from the scenario engine by this process; the
160 GPU processes are real processes here (sleepers with job labels in their environment), so
attribution reads the real /proc; it publishes through its spool to the embedded broker and
serves /metrics, scraped every 15 s as Prometheus would. Its CPU is measured from /proc over a
window after a warm-up; the feed's and the broker's CPU are not the agent's and are not counted.

Baseline, same run: an idle Python process that imports what the agent process imports (its
floor: `gpuledger agent` replaces itself with the lean `python -m gpuledger.agents` entry).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench._report import Figure, show
from bench._rig import ROOT, cpu_seconds, rss_mb
from gpuledger.agents.sim.engine import Scenario
from gpuledger.agents.sim.libnvml.build import build_library
from gpuledger.agents.sim.libnvml.feed import NvmlFeed
from gpuledger.broker import EmbeddedBroker, ensure_topics, free_port
from gpuledger.schema.topics import Topics

SUMMARY = "agent CPU (share of one core) and RSS, 8 GPUs x 20 processes at 1 Hz, vs the goal"
GOAL_CPU = 0.003  # of one core
GOAL_RSS_MB = 50.0
GPUS = 8
PROCESSES_PER_GPU = 20
NODE = "bench-node"


def spawn_workers() -> list[subprocess.Popen[bytes]]:
    """The node's GPU processes: real processes, labelled as a scheduler would."""
    workers = []
    for gpu in range(GPUS):
        for i in range(PROCESSES_PER_GPU):
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GPULEDGER_JOB_ID": f"job-{gpu}",
                "GPULEDGER_TEAM": f"team-{gpu % 3}",
                "GPULEDGER_PROJECT": "bench",
                "GPULEDGER_JOB_TYPE": "training",
                "RANK": str(i),
            }
            workers.append(subprocess.Popen(["sleep", "3600"], env=env))
    return workers


def scenario(pids: list[int]) -> Scenario:
    jobs = [
        {
            "job_id": f"job-{gpu}",
            "node": NODE,
            "gpus": [gpu],
            "profile": "busy",
            "mem_gb": 60,
            "label_env": False,  # the real processes carry their own environment
            "processes": [
                {"name": "python", "pid": pids[gpu * PROCESSES_PER_GPU + i]}
                for i in range(PROCESSES_PER_GPU)
            ],
        }
        for gpu in range(GPUS)
    ]
    return Scenario.from_dict(
        {
            "scenario": {"name": "bench", "seed": 1},
            "nodes": [{"name": NODE, "gpus": [{"name": "NVIDIA H100 80GB HBM3", "count": GPUS}]}],
            "jobs": jobs,
        },
        origin=time.time() - 120,
    )


def baseline_rss_mb() -> tuple[float, float]:
    """An idle interpreter with the agent's imports: (RSS MB, CPU share over 5 s)."""
    code = "import gpuledger.agents.__main__, gpuledger.agents.runner, time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        time.sleep(3)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(5)
        share = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        return rss_mb(proc.pid), share
    finally:
        proc.kill()
        proc.wait()


def run(quick: bool = False) -> None:
    warmup_s, measure_s = (6.0, 20.0) if quick else (15.0, 120.0)
    tmp = Path(tempfile.mkdtemp(prefix="gpuledger-bench-agent-"))
    library = build_library(tmp / "simnvml")
    workers = spawn_workers()
    stop = threading.Event()
    feed = NvmlFeed(tmp / "nvml.state", scenario([w.pid for w in workers]), NODE)
    feeder = threading.Thread(target=feed.run, args=(stop,), daemon=True)
    feeder.start()
    agent: subprocess.Popen[bytes] | None = None
    try:
        with EmbeddedBroker() as broker:
            ensure_topics(broker.bootstrap, Topics())
            port = free_port()
            env = {
                **os.environ,
                **feed.env,
                "LD_LIBRARY_PATH": str(library),
                "GPULEDGER_BOOTSTRAP": broker.bootstrap,
                "GPULEDGER_DATA_DIR": str(tmp / "data"),
            }
            log = (tmp / "agent.log").open("wb")
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gpuledger.cli",
                    "agent",
                    "--node-name",
                    NODE,
                    "--metrics-port",
                    str(port),
                    "--metrics-addr",
                    "127.0.0.1",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
            )
            time.sleep(warmup_s)
            if agent.poll() is not None:
                raise SystemExit(f"the agent exited: {(tmp / 'agent.log').read_text()[-2000:]}")
            cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
            next_scrape = t0
            scrapes = 0
            while (elapsed := time.monotonic() - t0) < measure_s:
                if time.monotonic() >= next_scrape:
                    url = f"http://127.0.0.1:{port}/metrics"
                    with urllib.request.urlopen(url, timeout=5) as response:
                        metrics = response.read().decode()
                    scrapes += 1
                    next_scrape += 15.0
                time.sleep(min(1.0, max(0.0, measure_s - elapsed)))
            cpu_share = (cpu_seconds(agent.pid) - cpu0) / (time.monotonic() - t0)
            rss, peak = rss_mb(agent.pid), rss_mb(agent.pid, "VmHWM")
            maps = Path(f"/proc/{agent.pid}/maps").read_text()
            sent = next(
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("gpuledger_agent_samples_sent_total")
            )
            series = sum(
                1 for line in metrics.splitlines() if line.startswith("gpuledger_process_")
            )
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
        stop.set()
        feeder.join(timeout=5)
        feed.close()
        for worker in workers:
            worker.kill()
        for worker in workers:
            worker.wait()
    base_rss, base_cpu = baseline_rss_mb()
    show(
        f"agent cost: {GPUS} GPUs x {PROCESSES_PER_GPU} processes at 1 Hz, "
        f"{measure_s:.0f} s after {warmup_s:.0f} s warm-up",
        [
            Figure(
                "CPU, share of one core",
                f"{cpu_share:.2%}",
                f"<= {GOAL_CPU:.1%}",
                cpu_share <= GOAL_CPU,
                f"{base_cpu:.2%} (idle, same imports)",
                f"{cpu_share / GOAL_CPU:.2f} x goal",
            ),
            Figure(
                "RSS (MB)",
                f"{rss:.1f} (peak {peak:.1f})",
                f"<= {GOAL_RSS_MB:.0f}",
                rss <= GOAL_RSS_MB,
                f"{base_rss:.1f} (idle, same imports)",
                f"{rss / GOAL_RSS_MB:.2f} x goal",
            ),
        ],
        [
            f"samples Kafka acknowledged: {sent:.0f}; per-process series on /metrics: {series}; "
            f"scrapes: {scrapes}",
            "chdb loaded in the agent: " + ("YES" if "chdb" in maps else "no")
            + "; faust: " + ("YES" if "faust" in maps else "no"),
        ],
    )  # fmt: skip
