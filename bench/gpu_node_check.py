"""`python -m bench.gpu_node_check [SECONDS]`: the agent on a real GPU node, checked against
nvidia-smi. Not a benchmark of `make bench` (it needs an NVIDIA driver); run it on a GPU node.

It starts two labelled GPU processes with PyTorch when it is installed (a busy matrix loop and
an idle one holding memory, as a forgotten notebook does), the embedded broker, and
`gpuledger agent` on the real `libnvidia-ml.so.1` with /metrics. While the agent runs it reads
`nvidia-smi` (compute apps, `pmon`); then it reads back what the agent published and prints,
per process, the memory and SM utilization of both, the agent's CPU share and RSS, and the
/metrics series. Everything it saw goes to stdout and, with `$OUT` set, to `$OUT/report.txt`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench._rig import cpu_seconds, rss_mb
from gpuledger.broker import EmbeddedBroker, ensure_topics, free_port
from gpuledger.schema.topics import Topics

ROOT = Path(__file__).resolve().parent.parent
NODE = "gpu-node-check"

_BUSY = """
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
end = time.time() + float(__import__("sys").argv[1])
while time.time() < end:
    for _ in range(20):
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
"""
_IDLE = """
import time, torch
held = torch.empty(6 * 2**30, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
time.sleep(float(__import__("sys").argv[1]))
"""

_lines: list[str] = []


def say(text: str = "") -> None:
    print(text, flush=True)
    _lines.append(text)


def shell(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({' '.join(cmd)}: {exc})"
    return (done.stdout + done.stderr).strip()


def start_workloads(seconds: float) -> list[subprocess.Popen[bytes]]:
    try:
        import torch

        if not torch.cuda.is_available():
            say("torch sees no CUDA device: no GPU processes started")
            return []
    except ImportError:
        say("no PyTorch here: no GPU processes started (the agent reads whatever runs)")
        return []
    started = []
    for job, code in (("train-check", _BUSY), ("notebook-check", _IDLE)):
        env = {
            **os.environ,
            "GPULEDGER_JOB_ID": job,
            "GPULEDGER_TEAM": "sre",
            "GPULEDGER_PROJECT": "node-check",
            "GPULEDGER_JOB_TYPE": "training" if job.startswith("train") else "notebook",
        }
        started.append(subprocess.Popen([sys.executable, "-c", code, str(seconds)], env=env))
    return started


def read_published(bootstrap: str, topics: Topics) -> list[dict[str, Any]]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topics.samples,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
    )
    samples: list[dict[str, Any]] = []
    for message in consumer:
        samples.extend(json.loads(message.value)["samples"])
    consumer.close()
    return samples


def compare(samples: list[dict[str, Any]], smi_apps: list[str], pmon: list[str]) -> None:
    per_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for sample in samples:
        for proc in sample.get("processes", []):
            per_pid[proc["pid"]].append(proc)
    say("\n## per process: agent (last 10 samples) vs nvidia-smi")
    smi_mem: dict[int, str] = {}
    for line in smi_apps:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[0].isdigit():
            smi_mem[int(parts[0])] = parts[2]
    smi_util: dict[int, list[str]] = defaultdict(list)
    for line in pmon:
        parts = line.split()
        if len(parts) > 4 and parts[1].isdigit():
            smi_util[int(parts[1])].append(parts[3])
    for pid, procs in sorted(per_pid.items()):
        last = procs[-10:]
        utils = [p.get("util_sm") for p in last]
        mem = last[-1].get("mem_used_bytes", 0) / 2**20
        say(
            f"pid {pid} {last[-1].get('name')!r} labels={last[-1].get('labels')} "
            f"container={last[-1].get('container_id')}: agent mem {mem:,.0f} MiB, "
            f"util_sm {utils}; nvidia-smi mem {smi_mem.get(pid, '-')}, "
            f"pmon sm% {smi_util.get(pid, [])[-10:]}"
        )
    if not per_pid:
        say("the agent published no process (see the samples above)")


def run_check(seconds: float) -> int:
    topics = Topics()
    tmp = Path(tempfile.mkdtemp(prefix="gpuledger-gpu-check-"))
    say("## nvidia-smi")
    say(shell(["nvidia-smi", "-L"]))
    say(shell(["nvidia-smi", "--query-gpu=name,driver_version,mig.mode.current", "--format=csv"]))
    workloads = start_workloads(seconds + 40)
    agent: subprocess.Popen[bytes] | None = None
    smi_apps: list[str] = []
    pmon: list[str] = []
    try:
        with EmbeddedBroker() as broker:
            ensure_topics(broker.bootstrap, topics)
            port = free_port()
            env = {
                **os.environ,
                "GPULEDGER_BOOTSTRAP": broker.bootstrap,
                "GPULEDGER_DATA_DIR": str(tmp / "data"),
            }
            log_path = tmp / "agent.log"
            with log_path.open("wb") as log:
                agent = subprocess.Popen(
                    [
                        *(sys.executable, "-m", "gpuledger.cli", "agent", "--node-name", NODE),
                        *("--metrics-port", str(port), "--metrics-addr", "127.0.0.1"),
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=log,
                )
                time.sleep(10)  # warm-up: imports, NVML init, the first samples
                if agent.poll() is not None:
                    say(log_path.read_text()[-4000:])
                    return 1
                cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
                while time.monotonic() - t0 < seconds:
                    smi_apps = shell(
                        [
                            "nvidia-smi",
                            "--query-compute-apps=pid,process_name,used_memory",
                            "--format=csv,noheader",
                        ]
                    ).splitlines()
                    pmon = shell(["nvidia-smi", "pmon", "-c", "5", "-s", "um"]).splitlines()
                share = (cpu_seconds(agent.pid) - cpu0) / (time.monotonic() - t0)
                rss = rss_mb(agent.pid)
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as response:
                    metrics = response.read().decode()
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=30)
            say("\n## agent log")
            say(log_path.read_text()[-3000:])
            say(f"\n## agent: CPU {share:.2%} of one core over {seconds:.0f} s, RSS {rss:.1f} MB")
            say("\n## nvidia-smi compute apps (last)\n" + "\n".join(smi_apps))
            say("\n## nvidia-smi pmon -s um (last)\n" + "\n".join(pmon))
            samples = read_published(broker.bootstrap, topics)
            say(f"\n## published: {len(samples)} GPU samples; the last per GPU:")
            last: dict[str, dict[str, Any]] = {}
            for sample in samples:
                last[sample["gpu_uuid"]] = sample
            for sample in last.values():
                say(json.dumps(sample, sort_keys=True))
            compare(samples, smi_apps, pmon)
            say("\n## /metrics (DCGM-named and per-process series, agent counters)")
            for line in metrics.splitlines():
                if line.startswith(("DCGM_", "gpuledger_")):
                    say(line)
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
        for proc in workloads:
            proc.kill()
            proc.wait()
        out = os.environ.get("OUT")
        if out:
            Path(out, "report.txt").write_text("\n".join(_lines) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_check(float(sys.argv[1]) if len(sys.argv) > 1 else 45.0))
