"""Orphaned GPU memory: processes that hold GPU memory after their job ended, or that belong to
no job, for longer than `after_s` (15 minutes by default). They cost money and block others.

A process (GPU, pid) holding memory is an orphan candidate in a sample when
- its label names a job that has ended by the sample's time (`JobRecord.end()`), or
- it carries no job label and no job holds its GPU at that time.

An episode starts with the first candidate sample and goes on while each sample of that GPU
shows the process as a candidate; it fires once it has lasted `after_s` (event time), and
resolves when a sample of the GPU no longer shows the process (it exited, or it holds no
memory) or shows it belonging to a live job. One alert per process: its `rule` is
`pid N`, so that two orphans on one GPU are two alerts. Dollars: what the GPU cost
(`usd_per_gpu_hour` of its facts) over the orphaned time.

Pure: the worker's observer (`gpuledger.streams.orphans`) feeds it samples, rates and jobs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gpuledger.ledger.cost import JobRecord
from gpuledger.ledger.idle import AlertEvent, owner_fields
from gpuledger.schema.messages import Alert, AlertKind, AlertState, GpuSample, ProcessSample

DEFAULT_AFTER_S = 900.0
GIB = 1024**3


@dataclass(slots=True)
class Orphan:
    gpu_uuid: str
    node: str
    pid: int
    name: str
    job_id: str  # the ended job its label names, or ''
    team: str
    project: str
    since: float
    end: float  # the end of the newest sample that showed it
    mem_bytes: int
    usd: float = 0.0
    fired_at: float | None = None

    @property
    def rule(self) -> str:
        return f"pid {self.pid}"

    def message(self) -> str:
        owner = f"after job {self.job_id} ended" if self.job_id else "with no job"
        return (
            f"process {self.pid} ({self.name or 'unnamed'}) holds "
            f"{self.mem_bytes / GIB:.1f} GiB of GPU memory {owner}"
        )


def orphan_of(
    process: ProcessSample,
    gpu_uuid: str,
    t: float,
    jobs: Mapping[str, JobRecord],
    holder: Callable[[str, float], JobRecord | None],
) -> tuple[bool, JobRecord | None]:
    """Whether `process` is an orphan at `t`, and the ended job its label names (None: it
    has no job at all). Not an orphan: it holds no memory, or its job is live."""
    if process.mem_used_bytes <= 0:
        return False, None
    labelled = process.labels.job_id
    if labelled:
        record = jobs.get(labelled)
        ended = record is not None and record.end() <= t
        return ended, record if ended else None
    return holder(gpu_uuid, t) is None, None


class OrphanTracker:
    def __init__(self, after_s: float = DEFAULT_AFTER_S) -> None:
        self.after_s = after_s
        self.open: dict[str, dict[int, Orphan]] = {}  # by GPU, then pid

    def restore(self, firing: Iterable[Alert]) -> None:
        """Episodes that were firing when the worker stopped: they are not fired again."""
        for alert in firing:
            if alert.kind is not AlertKind.orphaned_gpu_memory or not alert.rule.startswith("pid "):
                continue
            pid = int(alert.rule.removeprefix("pid "))
            self.open.setdefault(alert.gpu_uuid, {})[pid] = Orphan(
                **owner_fields(alert),
                pid=pid,
                name="",
                since=alert.since,
                end=alert.ts,
                mem_bytes=0,
                usd=alert.wasted_usd,
                fired_at=alert.since + self.after_s,
            )

    def observe(
        self,
        samples: Iterable[GpuSample],
        jobs: Mapping[str, JobRecord],
        holder: Callable[[str, float], JobRecord | None],
        usd_per_gpu_hour: Mapping[str, float],
    ) -> list[AlertEvent]:
        """The alerts these samples (in time order per GPU) fire or resolve."""
        out: list[AlertEvent] = []
        for sample in samples:
            seen: set[int] = set()
            rate = usd_per_gpu_hour.get(sample.gpu_uuid, 0.0)
            for process in sample.processes:
                orphaned, ended = orphan_of(process, sample.gpu_uuid, sample.ts, jobs, holder)
                if not orphaned:
                    continue
                seen.add(process.pid)
                self._candidate(sample, process, ended, rate, out)
            on_gpu = self.open.get(sample.gpu_uuid, {})
            for pid in [p for p in on_gpu if p not in seen]:
                orphan = on_gpu[pid]
                if sample.ts < orphan.end:
                    continue  # an older sample, late: it changes nothing
                del on_gpu[pid]
                if orphan.fired_at is not None:
                    out.append(self.event(orphan, AlertState.resolved, sample.ts))
            if not on_gpu:
                self.open.pop(sample.gpu_uuid, None)
        return out

    def _candidate(
        self,
        sample: GpuSample,
        process: ProcessSample,
        job: JobRecord | None,
        rate: float,
        out: list[AlertEvent],
    ) -> None:
        end = sample.ts + sample.interval_s
        on_gpu = self.open.setdefault(sample.gpu_uuid, {})
        orphan = on_gpu.get(process.pid)
        if orphan is None:
            orphan = Orphan(
                gpu_uuid=sample.gpu_uuid,
                node=sample.node,
                pid=process.pid,
                name=process.name,
                job_id=job.job_id if job else "",
                team=(job.team or "") if job else "",
                project=(job.project or "") if job else "",
                since=sample.ts,
                end=sample.ts,
                mem_bytes=0,
            )
            on_gpu[process.pid] = orphan
        if end <= orphan.end:
            return  # a sample already counted
        orphan.usd += rate * (end - max(orphan.end, sample.ts)) / 3600
        orphan.end = end
        orphan.mem_bytes = process.mem_used_bytes
        orphan.name = orphan.name or process.name
        if orphan.fired_at is None and end - orphan.since >= self.after_s:
            orphan.fired_at = end
            out.append(self.event(orphan, AlertState.firing, end))

    def firing(self) -> list[AlertEvent]:
        """The episodes firing now, as Alertmanager must keep hearing them."""
        return [
            self.event(o, AlertState.firing, o.end)
            for on_gpu in self.open.values()
            for o in on_gpu.values()
            if o.fired_at is not None
        ]

    def event(self, orphan: Orphan, state: AlertState, ts: float) -> AlertEvent:
        alert = Alert(
            ts=ts,
            kind=AlertKind.orphaned_gpu_memory,
            state=state,
            **owner_fields(orphan),
            since=orphan.since,
            idle_seconds=max(0.0, orphan.end - orphan.since),
            wasted_usd=orphan.usd,
            message=orphan.message(),
            rule=orphan.rule,
        )
        return AlertEvent(alert, notify=True, fired_at=orphan.fired_at or ts)
