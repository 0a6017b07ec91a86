"""What the worker knows besides samples: jobs, prices, nodes. In memory, no I/O.

Each change says which stored facts it may alter (a list of `Scope`s), so that the worker
can cancel and restate them (ARCHITECTURE.md §3). A change that alters nothing returns an empty
list: a replayed topic or a state rebuilt from the store corrects nothing.

Times that the store keeps to the millisecond (job starts and ends, price and node times) are
kept to the millisecond here too, so that a state rebuilt from the store after a restart is
the state the worker had before it: the same samples go to the same jobs at the same prices.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from gpuledger.ledger.cost import JobRecord, allocate, cost_sample, merge_job, sole_share
from gpuledger.ledger.facts import fact_of_row
from gpuledger.ledger.prices import PriceIndex
from gpuledger.ledger.restate import Scope
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import (
    JOB_TAGS,
    CostFact,
    GpuSample,
    IdleBasis,
    JobEvent,
    JobType,
    NodeInfo,
    PriceEntry,
)
from gpuledger.schema.pricebook import WILDCARD, GpuModelCatalog


class MetadataState:
    def __init__(
        self,
        catalog: GpuModelCatalog,
        idle_threshold: float = 0.05,
        idle_basis: IdleBasis = IdleBasis.busy_time,
    ) -> None:
        self.catalog = catalog
        self.idle_threshold = idle_threshold
        self.idle_basis = idle_basis
        self.jobs: dict[str, JobRecord] = {}
        self.jobs_by_gpu: dict[str, JobIds] = defaultdict(JobIds)
        self._holders: dict[str, _HolderIndex] = {}
        self.prices = PriceIndex([])
        self._price_keys: dict[str, PriceEntry] = {}
        # per node, its NodeInfo history sorted by ts: each governs samples from its ts on;
        # the first also governs the samples before it (a node announced late).
        self._nodes: dict[str, list[NodeInfo]] = {}

    # -- jobs ------------------------------------------------------------------------
    def apply_job(self, event: JobEvent) -> list[Scope]:
        event = _job_event_in_ms(event)
        old = self.jobs.get(event.job_id)
        new = merge_job(old, event)
        self.jobs[new.job_id] = new
        if old is not None and replace(new, ts=0.0) == replace(old, ts=0.0):
            return []  # a repeat of what we knew: nothing to correct
        for gpu in old.gpu_uuids if old else ():
            self.jobs_by_gpu[gpu].discard(new.job_id)
        for gpu in new.gpu_uuids:
            self.jobs_by_gpu[gpu].add(new.job_id)
        retag = _retagged(old, new)
        if retag is not None:
            # Who held what is unchanged: only the facts carrying the job's id change, in
            # their tags alone (its labels are in no fact).
            return [Scope(job_id=new.job_id, retag=retag)] if retag else []
        if old is not None and _same_but_end(old, new):
            # Only the end (or the state) moved: only samples between the two ends change
            # hands. A week-long job's finish must not re-cost its whole week.
            first, last = sorted((old.end(), new.end()))
            if first == last or not new.gpu_uuids or new.started_at is None:
                return []
            t_to = None if math.isinf(last) else last
            return [Scope(gpu_uuids=frozenset(new.gpu_uuids), t_from=first, t_to=t_to)]
        # Facts this job owned or may now own: any fact carrying its id (attributed through
        # labels, or before a change), and its GPUs from the earliest start either version
        # of it knew.
        scopes = [Scope(job_id=new.job_id)]
        gpus = frozenset((old.gpu_uuids if old else ()) + new.gpu_uuids)
        starts = [rec.started_at for rec in (old, new) if rec and rec.started_at is not None]
        if gpus and starts:
            scopes.append(Scope(gpu_uuids=gpus, t_from=min(starts)))
        return scopes

    def merged_retags(self, scopes: Iterable[Scope]) -> list[Scope]:
        """The retag scopes among `scopes` as the store applies them: each job's tags that
        they name, with the values its record has now (every correction costs with the
        state as it is now, whatever came between), and the jobs that take the same values
        in one scope."""
        columns: dict[str, set[str]] = defaultdict(set)
        for scope in scopes:
            if scope.retag and scope.job_id is not None:
                columns[scope.job_id].update(column for column, _ in scope.retag)
        groups: dict[tuple[tuple[str, str], ...], set[str]] = defaultdict(set)
        for job_id, named in columns.items():
            job = self.jobs[job_id]
            tags = tuple(
                (name, _stored_tag(getattr(job, name)))
                for name in JOB_TAGS
                if name in named and getattr(job, name) is not None
            )
            groups[tags].add(job_id)
        return [Scope(job_ids=frozenset(ids), retag=tags) for tags, ids in groups.items() if tags]

    def restore_job(self, record: JobRecord) -> None:
        """Put back a job as the store kept it (after a restart): nothing to correct."""
        old = self.jobs.get(record.job_id)
        for gpu in old.gpu_uuids if old else ():
            self.jobs_by_gpu[gpu].discard(record.job_id)
        self.jobs[record.job_id] = record
        for gpu in record.gpu_uuids:
            self.jobs_by_gpu[gpu].add(record.job_id)

    def job_recovery_scopes(self, job_id: str) -> list[Scope]:
        """Every fact a past change of this job may have altered, without knowing the change.

        For a worker that must redo corrections another life of it (or another worker) may
        have left undone: the facts carrying the job's id, and its GPUs from its start.
        """
        scopes = [Scope(job_id=job_id)]
        job = self.jobs.get(job_id)
        if job is not None and job.gpu_uuids and job.started_at is not None:
            scopes.append(Scope(gpu_uuids=frozenset(job.gpu_uuids), t_from=job.started_at))
        return scopes

    # -- prices ----------------------------------------------------------------------
    def apply_price(self, entry: PriceEntry) -> list[Scope]:
        entry = _in_ms(entry, "effective_from")
        if self._price_keys.get(entry.key) == entry:
            return []
        self._price_keys[entry.key] = entry
        self.prices.add(entry)
        return self.price_scopes(entry)

    def price_scopes(self, entry: PriceEntry) -> list[Scope]:
        """The facts an entry governs: its model, place and pricing model, from its
        `effective_from` to the next entry of the same series."""
        entry = _in_ms(entry, "effective_from")
        series = (entry.provider, entry.region, entry.gpu_model, entry.pricing_model)
        later = [
            e.effective_from
            for e in self._price_keys.values()
            if (e.provider, e.region, e.gpu_model, e.pricing_model) == series
            and e.effective_from > entry.effective_from
        ]
        return [
            Scope(
                gpu_model=None if entry.gpu_model == WILDCARD else entry.gpu_model,
                provider=None if entry.provider == WILDCARD else entry.provider,
                region=None if entry.region == WILDCARD else entry.region,
                pricing_model=entry.pricing_model.value,
                t_from=entry.effective_from,
                t_to=min(later) if later else None,
                price_only=True,
            )
        ]

    # -- nodes -----------------------------------------------------------------------
    def apply_node(self, info: NodeInfo) -> list[Scope]:
        info = _in_ms(info, "ts")
        history = self._nodes.setdefault(info.node, [])
        stamps = [n.ts for n in history]
        at = bisect.bisect_left(stamps, info.ts)
        if at < len(history) and history[at].ts == info.ts:
            if history[at] == info:
                return []
            history[at] = info  # the same moment, described again: the newer word wins
        else:
            history.insert(at, info)
        return self.node_scopes(info)

    def node_scopes(self, info: NodeInfo) -> list[Scope]:
        """The facts a `NodeInfo` governs: its node from its `ts` (from the start for the
        node's first) to the node's next `NodeInfo`."""
        info = _in_ms(info, "ts")
        stamps = [n.ts for n in self._nodes.get(info.node, ())]
        at = bisect.bisect_left(stamps, info.ts)
        t_from = None if at == 0 else info.ts
        later = [t for t in stamps if t > info.ts]
        t_to = min(later) if later else None
        return [Scope(node=info.node, t_from=t_from, t_to=t_to, price_only=True)]

    def nodes(self) -> list[NodeInfo]:
        """Every `NodeInfo` known, each node's in time order."""
        return [info for history in self._nodes.values() for info in history]

    def node_span(self, node: str, t: float) -> tuple[NodeInfo | None, float]:
        """What `node_at` answers at t, and when the node's next description takes over."""
        history = self._nodes.get(node)
        if not history:
            return None, math.inf
        after = max(bisect.bisect_right([n.ts for n in history], t), 1)
        return history[after - 1], history[after].ts if after < len(history) else math.inf

    def node_at(self, node: str, ts: float) -> NodeInfo | None:
        return self.node_span(node, ts)[0]

    # -- costing ---------------------------------------------------------------------
    def cost_all(self, samples: Iterable[GpuSample]) -> list[CostFact]:
        """The facts of these samples, in order."""
        return [fact_of_row(row) for row in self.cost_rows(samples)]

    def cost_rows(self, samples: Iterable[GpuSample]) -> list[list[Any]]:
        """What `cost_all` answers, as rows (`ledger/facts.py`): the worker's hot loop
        (locals, no scans)."""
        rows: list[list[Any]] = []
        jobs = self.jobs
        jobs_by_gpu = self.jobs_by_gpu
        nodes = self._nodes
        prices, catalog, threshold = self.prices, self.catalog, self.idle_threshold
        for sample in samples:
            ids = jobs_by_gpu.get(sample.gpu_uuid)
            holder = self._holder(sample.gpu_uuid, ids, sample.ts) if ids else None
            # A holder takes the whole GPU: what allocate answers, without asking it again.
            shares = sole_share(holder) if holder is not None else allocate(sample, (), jobs)
            history = nodes.get(sample.node)
            if history is None:
                node = None
            elif len(history) == 1:
                node = history[0]  # what node_at answers for a node described once
            else:
                node = self.node_at(sample.node, sample.ts)
            rows += cost_sample(
                sample,
                shares,
                node=node,
                price_index=prices,
                catalog=catalog,
                idle_threshold=threshold,
                idle_basis=self.idle_basis,
            )
        return rows

    def holder(self, gpu_uuid: str, t: float) -> JobRecord | None:
        """The job its scheduler gave the GPU at t (the one costing attributes it to), or None."""
        ids = self.jobs_by_gpu.get(gpu_uuid)
        return self._holder(gpu_uuid, ids, t) if ids else None

    def _holder(self, gpu_uuid: str, ids: JobIds, t: float) -> JobRecord | None:
        """The job explicitly holding the GPU at t: what `allocate` would pick from all the
        GPU's jobs, found by bisecting its jobs' starts instead of asking each (a GPU that ran
        a thousand jobs cost 160 µs a sample that way)."""
        index = self._holders.get(gpu_uuid)
        if index is None or index.ids is not ids or index.version != ids.version:
            index = self._holders[gpu_uuid] = _HolderIndex.of(ids, self.jobs)
        jobs = self.jobs
        at = bisect.bisect_right(index.starts, t)
        while at > 0:
            at -= 1
            if index.reach[at] <= t:
                return None  # every job started by then had ended by t
            job = jobs[index.job_ids[at]]
            if job.holds(gpu_uuid, t):
                return job
        return None


class JobIds(set[str]):
    """A GPU's job ids, counting their changes (MetadataState keeps an index of them).

    Every change of a job that can change who holds a GPU (its GPUs, start, end or state)
    goes through `discard` and `add` on its GPUs' sets (apply_job, restore_job)."""

    __slots__ = ("version",)

    def __init__(self, ids: Iterable[str] = ()) -> None:
        super().__init__(ids)
        self.version = 0

    def add(self, job_id: str) -> None:
        super().add(job_id)
        self.version += 1

    def discard(self, job_id: object) -> None:
        super().discard(job_id)
        self.version += 1

    def remove(self, job_id: str) -> None:
        super().remove(job_id)
        self.version += 1

    def clear(self) -> None:
        super().clear()
        self.version += 1

    def update(self, *others: Iterable[str]) -> None:
        super().update(*others)
        self.version += 1

    def difference_update(self, *others: Iterable[Any]) -> None:
        super().difference_update(*others)
        self.version += 1

    def pop(self) -> str:
        self.version += 1
        return super().pop()

    def __ior__(self, other: AbstractSet[str]) -> JobIds:  # type: ignore[override,misc]
        self.version += 1
        super().__ior__(other)
        return self

    def __isub__(self, other: AbstractSet[object]) -> JobIds:
        self.version += 1
        super().__isub__(other)
        return self


@dataclass(frozen=True, slots=True)
class _HolderIndex:
    """One GPU's jobs by start (equal starts: larger job_id first, so a backward walk meets
    the winner of `allocate`'s tie-break first) and, per position, the latest end of the
    jobs up to it: a walk back from t stops where no earlier job can reach t."""

    ids: JobIds
    version: int
    starts: list[float]
    job_ids: list[str]
    reach: list[float]

    @classmethod
    def of(cls, ids: JobIds, jobs: dict[str, JobRecord]) -> _HolderIndex:
        started = [jobs[j] for j in ids if jobs[j].started_at is not None]
        started.sort(key=lambda job: job.job_id, reverse=True)
        started.sort(key=lambda job: job.started_at or 0.0)
        reach: list[float] = []
        latest = -math.inf
        for job in started:
            # ended_at, when known, moves only through apply_job (the version counts it);
            # an end taken from the state's time may move without it: count it as open.
            latest = max(latest, job.ended_at if job.ended_at is not None else math.inf)
            reach.append(latest)
        return cls(
            ids,
            ids.version,
            [job.started_at or 0.0 for job in started],
            [job.job_id for job in started],
            reach,
        )


def _holding(job: JobRecord | None) -> tuple[frozenset[str], float, float] | None:
    """What a job holds explicitly (`JobRecord.holds`): its GPUs from its start to its end."""
    if job is None or job.started_at is None or not job.gpu_uuids:
        return None
    return frozenset(job.gpu_uuids), job.started_at, job.end()


def _retagged(old: JobRecord | None, new: JobRecord) -> tuple[tuple[str, str], ...] | None:
    """(column, stored value) of the tags `new` changes, when it holds what `old` held and
    only gains or changes tags (a fact's tag is its job's own where the job has one, so a
    changed tag is every such fact's new value); None when the change is more than that."""
    if _holding(old) != _holding(new):
        return None
    changed: list[tuple[str, str]] = []
    for name in JOB_TAGS:
        before, after = getattr(old, name, None), getattr(new, name)
        if after == before:
            continue
        if after is None:
            return None  # a tag forgotten: the facts fall back to their processes' labels
        changed.append((name, _stored_tag(after)))
    return tuple(changed)


def _stored_tag(value: object) -> str:
    """A job tag as a fact stores it."""
    return value.value if isinstance(value, JobType) else str(value)


def _same_but_end(old: JobRecord, new: JobRecord) -> bool:
    """True when the two versions attribute the same way up to their ends."""
    return (
        old.gpu_uuids == new.gpu_uuids
        and old.started_at == new.started_at
        and (old.team, old.project, old.job_type, old.experiment_id, old.model, old.environment)
        == (new.team, new.project, new.job_type, new.experiment_id, new.model, new.environment)
    )


_M = TypeVar("_M", PriceEntry, NodeInfo)


def _to_ms(t: float | None) -> float | None:
    return None if t is None else to_ms(t) / 1000


def _in_ms(message: _M, name: str) -> _M:
    value = getattr(message, name)
    exact = _to_ms(value)
    return message if exact == value else message.model_copy(update={name: exact})


def _job_event_in_ms(event: JobEvent) -> JobEvent:
    start, end = _to_ms(event.started_at), _to_ms(event.ended_at)
    if start == event.started_at and end == event.ended_at:
        return event
    return event.model_copy(update={"started_at": start, "ended_at": end})
