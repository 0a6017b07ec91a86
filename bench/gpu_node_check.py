"""`python -m bench.gpu_node_check [SECONDS]`: the agent on a real GPU node, checked against
nvidia-smi. Not a benchmark of `make bench` (it needs an NVIDIA driver); run it on a GPU node.

It starts two labelled GPU processes with PyTorch when it is installed (a busy matrix loop and
an idle one holding memory, as a forgotten notebook does), the embedded broker, and
`gpuledger agent` on the real `libnvidia-ml.so.1` with /metrics. While the agent runs it reads
`nvidia-smi` (compute apps, `pmon`); then it reads back what the agent published and prints,
per process, the memory and SM utilization of both, the agent's CPU share and RSS, and the
/metrics series. Everything it saw goes to stdout and, with `$OUT` set, to `$OUT/report.txt`.

GPM: the busy loop runs the first half of the measured time and a tiny-kernel loop (one
one-element kernel after another: busy ~100 %, a few SMs) the second half, on GPU 0. Per
phase it prints GPU 0's busy time and SM activity as the agent published them beside
`nvidia-smi dmon -s u` (busy time) and, where `dcgmi` is installed, DCGM's profiling fields
1002-1005 (SM active, SM occupancy, tensor and DRAM activity).
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
_TINY = """
import sys, time, torch
time.sleep(float(sys.argv[2]))
x = torch.zeros(1, device="cuda")
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for _ in range(2000):
        x.add_(1)
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


def start_workloads(busy_s: float, tiny_s: float, hold_s: float) -> list[subprocess.Popen[bytes]]:
    """The busy loop for `busy_s`, then the tiny-kernel loop for `tiny_s`; the idle notebook
    holds memory for `hold_s`."""
    try:
        import torch

        if not torch.cuda.is_available():
            say("torch sees no CUDA device: no GPU processes started")
            return []
    except ImportError:
        say("no PyTorch here: no GPU processes started (the agent reads whatever runs)")
        return []
    started = []
    for job, code, args in (
        ("train-check", _BUSY, [str(busy_s)]),
        ("tiny-check", _TINY, [str(tiny_s), str(busy_s)]),
        ("notebook-check", _IDLE, [str(hold_s)]),
    ):
        env = {
            **os.environ,
            "GPULEDGER_JOB_ID": job,
            "GPULEDGER_TEAM": "sre",
            "GPULEDGER_PROJECT": "node-check",
            "GPULEDGER_JOB_TYPE": "notebook" if job.startswith("notebook") else "training",
        }
        started.append(subprocess.Popen([sys.executable, "-c", code, *args], env=env))
    return started


def parse_dmon(text: str) -> list[tuple[str, int, float]]:
    """(HH:MM:SS, GPU index, sm %) of `nvidia-smi dmon -s u -o T` lines; others skipped."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#") and parts[1].isdigit():
            try:
                found.append((parts[0], int(parts[1]), float(parts[2])))
            except ValueError:
                continue  # "-" where the driver has no value
    return found


def parse_dcgmi(text: str) -> list[tuple[int, list[float]]]:
    """(GPU index, [field values]) of `dcgmi dmon` lines ("GPU 0  0.812  0.400 ...")."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "GPU" and parts[1].isdigit():
            try:
                found.append((int(parts[1]), [float(v) for v in parts[2:]]))
            except ValueError:
                continue  # N/A
    return found


def rss_by_mapping(pid: int, top: int = 8) -> list[tuple[str, float]]:
    """The `top` largest contributors to a process's RSS (MB), by mapped file ([anon] else)."""
    sizes: dict[str, int] = defaultdict(int)
    name = "[anon]"
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                head = line.split()
                if head and "-" in head[0] and not head[0].endswith(":"):
                    name = head[5] if len(head) > 5 else "[anon]"
                elif head and head[0] == "Rss:":
                    sizes[name] += int(head[1])
    except OSError as exc:
        return [(f"(smaps: {exc})", 0.0)]
    biggest = sorted(sizes.items(), key=lambda item: -item[1])[:top]
    return [(path, kb / 1024) for path, kb in biggest]


_FOOTPRINT = """
import pynvml
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
import gpuledger.agents.runner
marks = [("imports (pynvml, gpuledger.agents.runner)", rss())]
pynvml.nvmlInit()
marks.append(("nvmlInit", rss()))
handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
def tolerate(func, *args):
    try:
        return func(*args)
    except pynvml.NVMLError:
        return None  # NotSupported on some GPUs and MIG modes: the footprint is what matters
for h in handles:
    tolerate(pynvml.nvmlDeviceGetUtilizationRates, h)
    tolerate(pynvml.nvmlDeviceGetMemoryInfo, h)
    tolerate(pynvml.nvmlDeviceGetComputeRunningProcesses, h)
    tolerate(pynvml.nvmlDeviceGetProcessUtilization, h, 0)
marks.append(("device and process reads", rss()))
for h in handles:
    a, b = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
    tolerate(pynvml.nvmlGpmSampleGet, h, a)
    tolerate(pynvml.nvmlGpmSampleGet, h, b)
marks.append(("GPM: two samples per GPU", rss()))
for label, mb in marks:
    print(f"{label}: RSS {mb:.1f} MB")
"""


def nvml_footprint() -> str:
    """What NVML itself adds to a process's RSS, step by step (a fresh process)."""
    return shell([sys.executable, "-c", _FOOTPRINT])


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def phase_means(
    samples: list[dict[str, Any]], gpu_index: int, start: float, end: float
) -> dict[str, float | None]:
    """GPU `gpu_index`'s mean busy time and GPM figures over published samples in [start, end)."""
    inside = [
        s
        for s in samples
        if s.get("gpu_index") == gpu_index and not s.get("mig_profile") and start <= s["ts"] < end
    ]
    names = ("util_sm", "sm_active", "sm_occupancy", "tensor_active", "dram_active")
    return {n: mean([float(s[n]) for s in inside if s.get(n) is not None]) for n in names}


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


def _start_monitors(seconds: float, tmp: Path) -> dict[str, Path]:
    """nvidia-smi dmon (and dcgmi dmon where installed) over the measured time, to files."""
    outputs: dict[str, Path] = {}
    commands = {"dmon": ["nvidia-smi", "dmon", "-s", "u", "-o", "T", "-c", str(int(seconds))]}
    if shutil.which("dcgmi"):
        commands["dcgmi"] = [
            *("dcgmi", "dmon", "-e", "1002,1003,1004,1005", "-d", "1000"),
            *("-c", str(int(seconds))),
        ]
    for name, command in commands.items():
        outputs[name] = tmp / f"{name}.txt"
        with outputs[name].open("wb") as out:
            try:
                subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            except OSError as exc:
                out.write(f"({' '.join(command)}: {exc})".encode())
    return outputs


def compare_gpm(
    samples: list[dict[str, Any]],
    monitors: dict[str, Path],
    busy: tuple[float, float],
    tiny_from: float,
) -> None:
    say("\n## GPU 0 by phase: the agent (busy time, GPM) vs nvidia-smi dmon and DCGM")
    dmon = parse_dmon(monitors["dmon"].read_text(errors="replace"))
    dcgm = parse_dcgmi(monitors["dcgmi"].read_text(errors="replace")) if "dcgmi" in monitors else []
    say(f"dmon lines {len(dmon)}, dcgmi lines {len(dcgm)}")
    last_ts = max((s["ts"] for s in samples), default=tiny_from)
    for phase, (start, end) in (("busy", busy), ("tiny kernels", (tiny_from, last_ts + 1))):
        agent = phase_means(samples, 0, start, end)
        day = {time.strftime("%H:%M:%S", time.localtime(t)) for t in range(int(start), int(end))}
        smi = mean([sm / 100 for hms, gpu, sm in dmon if gpu == 0 and hms in day])
        say(f"{phase}: agent {json.dumps(agent)}; nvidia-smi dmon sm {smi}")
    if dcgm:
        say(f"dcgmi (GPU 0, fields 1002-1005, all lines): {[v for g, v in dcgm if g == 0]}")


def run_check(seconds: float) -> int:
    topics = Topics()
    tmp = Path(tempfile.mkdtemp(prefix="gpuledger-gpu-check-"))
    say("## nvidia-smi")
    say(shell(["nvidia-smi", "-L"]))
    say(shell(["nvidia-smi", "--query-gpu=name,driver_version,mig.mode.current", "--format=csv"]))
    wall0 = time.time()
    warm_s = 10.0
    busy_end = wall0 + warm_s + seconds / 2
    workloads = start_workloads(warm_s + seconds / 2, seconds / 2 + 5, seconds + 40)
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
                monitors = _start_monitors(seconds, tmp)
                cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
                rss0 = rss_mb(agent.pid)
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
                mappings = rss_by_mapping(agent.pid)
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as response:
                    metrics = response.read().decode()
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=30)
            say("\n## agent log")
            say(log_path.read_text()[-3000:])
            say(f"\n## agent: CPU {share:.2%} of one core over {seconds:.0f} s, RSS {rss:.1f} MB")
            say(f"RSS {rss0:.1f} MB at the window's start; largest parts at its end:")
            say("\n".join(f"  {mb:7.1f} MB  {path}" for path, mb in mappings))
            say("\n## NVML's own footprint (a fresh process)\n" + nvml_footprint())
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
            compare_gpm(samples, monitors, (wall0 + warm_s + 3, busy_end - 1), busy_end + 3)
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
