"""Process → job: labels from a process's environment, container and pod from its cgroup.

NVML gives PIDs in the host's PID namespace, so the agent needs the host's /proc (hostPID in
Kubernetes) and the right to read other users' `environ` (root or CAP_SYS_PTRACE). Whatever
cannot be read becomes `None`, never an error: a process may exit between NVML listing it and
us looking at it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpuledger.schema.messages import JobType, ProcessLabels

# Labels are bounded (gpuledger.schema.messages.Label); longer values are cut, not refused.
_MAX_LABEL = 256

# Environment variables that name a process's job, in order of preference per label.
JOB_ID_VARS = ("GPULEDGER_JOB_ID", "SLURM_JOB_ID")
TEAM_VARS = ("GPULEDGER_TEAM", "SLURM_JOB_ACCOUNT")
PROJECT_VARS = ("GPULEDGER_PROJECT",)
JOB_TYPE_VARS = ("GPULEDGER_JOB_TYPE",)
EXPERIMENT_VARS = ("GPULEDGER_EXPERIMENT_ID", "MLFLOW_RUN_ID", "WANDB_RUN_ID")
MODEL_VARS = ("GPULEDGER_MODEL",)
ENVIRONMENT_VARS = ("GPULEDGER_ENVIRONMENT",)

_CONTAINER_SCOPE = re.compile(
    r"^(?:docker|cri-containerd|crio|libpod|nerdctl)-([0-9a-f]{64})\.scope$"
)
_BARE_CONTAINER = re.compile(r"^(?:[0-9a-f]{64})$")
# Slurm's cgroup plugin: /slurm/uid_1000/job_42/step_0 (v1), /slurmstepd.scope/job_42/... (v2)
_SLURM_JOB = re.compile(r"/slurm[^/]*/(?:uid_\d+/)?job_(\d+)(?:/|$)")
# kubepods-burstable-pod1a2b3c4d_....slice (systemd driver) or pod1a2b3c4d-... (cgroupfs)
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


@dataclass(frozen=True)
class ProcessAttribution:
    """What the node knows about a GPU process besides NVML's numbers."""

    name: str | None = None
    container_id: str | None = None
    pod_uid: str | None = None
    labels: ProcessLabels = field(default_factory=ProcessLabels)


UNKNOWN = ProcessAttribution()

# The reader takes any callable of this shape: /proc for real processes, the scenario for
# simulated ones (their PIDs do not exist on this machine).
Attributor = Callable[[int], ProcessAttribution]


def parse_environ(raw: bytes) -> dict[str, str]:
    """`/proc/<pid>/environ` (NUL-separated `KEY=value`) as a dict; odd entries are skipped."""
    env: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep and key:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value[:_MAX_LABEL]
    return None


def labels_from_environ(env: Mapping[str, str]) -> ProcessLabels:
    """Job labels from a process environment (GPULEDGER_*, then Slurm, MLflow, W&B):
    job id, team, project, job type, experiment, model and environment."""
    job_type_text = _first(env, JOB_TYPE_VARS)
    job_type: JobType | None = None
    if job_type_text is not None:
        # An unknown type still says "this is a job": keep it as `other` rather than drop it.
        try:
            job_type = JobType(job_type_text.lower())
        except ValueError:
            job_type = JobType.other
    return ProcessLabels(
        job_id=_first(env, JOB_ID_VARS),
        team=_first(env, TEAM_VARS),
        project=_first(env, PROJECT_VARS),
        job_type=job_type,
        experiment_id=_first(env, EXPERIMENT_VARS),
        model=_first(env, MODEL_VARS),
        environment=_first(env, ENVIRONMENT_VARS),
    )


def parse_cgroup(text: str) -> tuple[str | None, str | None]:
    """(container id, pod uid) from `/proc/<pid>/cgroup` text, cgroup v1 or v2.

    Understands docker, containerd (cri-containerd-<id>.scope), CRI-O (crio-<id>.scope),
    podman, nerdctl, and Kubernetes pod slices under both the systemd and the cgroupfs
    driver. A process outside containers (a systemd session or service) gives (None, None).
    """
    container_id: str | None = None
    pod_uid: str | None = None
    for line in text.splitlines():
        # hierarchy-id:controllers:path; v2 has the single line "0::/path"
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2]
        for component in reversed(path.split("/")):
            if container_id is None:
                match = _CONTAINER_SCOPE.match(component) or _BARE_CONTAINER.match(component)
                if match:
                    container_id = match.group(match.lastindex or 0)
            if pod_uid is None and component.startswith(("kubepods", "pod")):
                pod = _POD.search(component)
                if pod:
                    pod_uid = pod.group(1).replace("_", "-")
        if container_id is not None and pod_uid is not None:
            break
    return container_id, pod_uid


def slurm_job_from_cgroup(text: str) -> str | None:
    """The Slurm job id in a process's cgroup path, or None outside Slurm's cgroups.

    /proc/<pid>/cgroup is readable by anyone, unlike `environ`: this names the job of a
    Slurm process even when the agent may not read its environment.
    """
    for line in text.splitlines():
        match = _SLURM_JOB.search(line.split(":", 2)[-1])
        if match:
            return match.group(1)
    return None


def start_time(stat: str) -> int | None:
    """Field 22 of `/proc/<pid>/stat` (start time in clock ticks), or None if unreadable."""
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    _, sep, rest = stat.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:  # gone, or not ours to read
        return None


def attribute(pid: int, proc_root: Path = Path("/proc")) -> ProcessAttribution:
    """Everything /proc says about `pid`; unreadable parts are None."""
    base = proc_root / str(pid)
    comm = _read_bytes(base / "comm")
    environ = _read_bytes(base / "environ")
    cgroup = _read_bytes(base / "cgroup")
    container_id, pod_uid = (None, None)
    cgroup_text = cgroup.decode("utf-8", "replace") if cgroup is not None else ""
    if cgroup_text:
        container_id, pod_uid = parse_cgroup(cgroup_text)
    labels = labels_from_environ(parse_environ(environ)) if environ else ProcessLabels()
    if labels.job_id is None:
        slurm_job = slurm_job_from_cgroup(cgroup_text)
        if slurm_job is not None:
            labels = labels.model_copy(update={"job_id": slurm_job})
    name = comm.decode("utf-8", "replace").strip() if comm else ""
    return ProcessAttribution(
        name=name or None,
        container_id=container_id,
        pod_uid=pod_uid,
        labels=labels,
    )


class ProcAttributor:
    """`attribute` cached for a process's lifetime: what /proc says is read once per process.

    A process is known by (pid, start time). The reader calls `prune` with the PIDs still on a
    GPU after every read, which ends a lifetime as far as the cache goes: a PID that leaves
    the GPUs and comes back is read afresh. While a PID stays, its start time is checked again
    every `revalidate_s`, so that a PID reused by a new process between two reads is noticed.
    """

    def __init__(self, proc_root: Path = Path("/proc"), revalidate_s: float = 30.0) -> None:
        self.proc_root = proc_root
        self.revalidate_s = revalidate_s
        self._root = str(proc_root)
        # pid -> (start time, when it was last checked, what /proc said)
        self._cache: dict[int, tuple[int, float, ProcessAttribution]] = {}

    def __call__(self, pid: int) -> ProcessAttribution:
        cached = self._cache.get(pid)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self.revalidate_s:
            return cached[2]
        started = self._start_time(pid)
        if started is None:
            self._cache.pop(pid, None)
            return UNKNOWN
        if cached is not None and cached[0] == started:
            self._cache[pid] = (started, now, cached[2])
            return cached[2]
        found = attribute(pid, self.proc_root)
        self._cache[pid] = (started, now, found)
        return found

    def _start_time(self, pid: int) -> int | None:
        try:
            with open(f"{self._root}/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone, or not ours to read
            return None
        return start_time(stat.decode("utf-8", "replace"))

    def prune(self, live_pids: set[int]) -> None:
        """Forget PIDs that are no longer on any GPU."""
        for pid in [p for p in self._cache if p not in live_pids]:
            del self._cache[pid]
