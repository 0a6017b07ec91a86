"""Process → job: labels from a process's environment, container and pod from its cgroup.

NVML gives PIDs in the host's PID namespace, so the agent needs the host's /proc (hostPID in
Kubernetes) and the right to read other users' `environ` (root or CAP_SYS_PTRACE). Whatever
cannot be read becomes `None`, never an error: a process may exit between NVML listing it and
us looking at it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from schema.messages import JobType, ProcessLabels

# Labels are bounded (schema.messages.Label); longer values are cut, not refused.
_MAX_LABEL = 256

# Environment variables that name a process's job, in order of preference per label.
JOB_ID_VARS = ("GPULEDGER_JOB_ID", "SLURM_JOB_ID")
TEAM_VARS = ("GPULEDGER_TEAM", "SLURM_JOB_ACCOUNT")
PROJECT_VARS = ("GPULEDGER_PROJECT",)
JOB_TYPE_VARS = ("GPULEDGER_JOB_TYPE",)
EXPERIMENT_VARS = ("GPULEDGER_EXPERIMENT_ID", "MLFLOW_RUN_ID", "WANDB_RUN_ID")

_CONTAINER_SCOPE = re.compile(
    r"^(?:docker|cri-containerd|crio|libpod|nerdctl)-([0-9a-f]{64})\.scope$"
)
_BARE_CONTAINER = re.compile(r"^(?:[0-9a-f]{64})$")
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
    """Job labels from a process environment (GPULEDGER_*, then Slurm, MLflow, W&B)."""
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
    if cgroup is not None:
        container_id, pod_uid = parse_cgroup(cgroup.decode("utf-8", "replace"))
    labels = labels_from_environ(parse_environ(environ)) if environ else ProcessLabels()
    name = comm.decode("utf-8", "replace").strip() if comm else ""
    return ProcessAttribution(
        name=name or None,
        container_id=container_id,
        pod_uid=pod_uid,
        labels=labels,
    )


class ProcAttributor:
    """`attribute` with a cache keyed by (pid, start time), so a reused PID is read afresh.

    Only /proc/<pid>/stat is read for a known process. `prune` with the PIDs still on a GPU
    keeps the cache as small as the set of live GPU processes.
    """

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self.proc_root = proc_root
        self._cache: dict[int, tuple[int, ProcessAttribution]] = {}

    def __call__(self, pid: int) -> ProcessAttribution:
        stat = _read_bytes(self.proc_root / str(pid) / "stat")
        started = start_time(stat.decode("utf-8", "replace")) if stat else None
        if started is None:
            self._cache.pop(pid, None)
            return UNKNOWN
        cached = self._cache.get(pid)
        if cached is not None and cached[0] == started:
            return cached[1]
        found = attribute(pid, self.proc_root)
        self._cache[pid] = (started, found)
        return found

    def prune(self, live_pids: set[int]) -> None:
        """Forget PIDs that are no longer on any GPU."""
        for pid in list(self._cache):
            if pid not in live_pids:
                del self._cache[pid]
