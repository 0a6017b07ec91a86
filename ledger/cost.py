"""The cost model of ARCHITECTURE.md §3 as pure functions: job merge, allocation, price, cost rows.

Nothing here does I/O: the worker feeds it parsed messages and writes what it returns.

Decisions (where the contract leaves a choice):

- **Job merge, out of order.** Every field of a `JobRecord` remembers the `ts` of the event
  that set it (`field_ts`; labels per key). An event changes a field only when it carries the
  field (a null counts as absent) and its `ts` is >= the field's; so a late, older event
  fills in what is unknown and never overwrites newer state. A record rebuilt without
  `field_ts` (from the `jobs` table) treats its set fields as of `record.ts`.
- **Restart.** A `started_at` newer than the known `ended_at` (and set by a newer event) means
  the job ran again under the same id: `ended_at` is cleared.
- **Explicit allocation.** A job holds GPU g at t when g is in its `gpu_uuids`, `started_at`
  is known and <= t, and t is before its end. The end is `ended_at`; failing that, for a job
  whose state is finished, the `ts` of the event that finished it; else open. A job with no
  `started_at` holds nothing explicitly (its processes' labels may still name it). When
  several jobs hold the same GPU at t, the latest `started_at` wins, then the smallest
  `job_id`.
- **Label split.** §4.4 by `util_sm` when some process reports one and the denominator is
  > 0 (processes without a `util_sm` count 0); else (no process reports a `util_sm`, or all
  report 0) by `mem_used_bytes`; when both are 0 the processes share equally.
  Processes without `labels.job_id` take their part to the unallocated row. Every labelled
  job gets a row, even with share 0; the unallocated row appears when the remainder > 1e-12.
  A label job's team/project/... come from its `JobRecord` field by field, else from the
  first process that carries them.
- **MIG.** `Ng.*` is N/slices of the GPU; a compute instance `Mc.Ng.*` (M of the N slices'
  compute) is M/slices, so the compute instances of one GPU instance add up to it; capped
  at 1. A profile on a model whose slice count is unknown counts 7 slices (every MIG GPU but
  the A30 has 7); a profile without a slice count (unparseable) counts as the whole GPU.
  A node override (`NodeInfo.usd_per_gpu_hour`) is a whole GPU's price, sliced the same way.
- **Row values.** `usd_per_gpu_hour` is the effective rate of the GPU or MIG instance (price
  x MIG fraction); `cost_usd = usd_per_gpu_hour * duration_s / 3600 * share`. `util_sm` and
  `sm_active` are the GPU's own in every row. Idleness is judged by the idle basis: the busy
  time (`util_sm`, the default) or the SM activity where the GPU has one; when the judged
  utilization is null, `idle_cost_usd` and `idle` are 0. `mem_used_bytes`
  and `power_w` are the GPU's values times the row's share, so that they add up over a
  sample's rows like the cost does (the memory remainder of rounding goes to the last row).
- **Unknown model.** A product name that no pattern matches keeps its raw name as
  `gpu_model`; it is priced only by a node override, else `price_missing = 1`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gpuledger.ledger.facts import AT, FACT_FIELDS
from gpuledger.ledger.prices import PRICING_VALUE, PriceIndex
from gpuledger.schema.messages import (
    FINISHED_STATES,
    JOB_TAGS,
    GpuSample,
    IdleBasis,
    JobEvent,
    JobState,
    JobType,
    NodeInfo,
    PriceEntry,
    PricingModel,
    ProcessLabels,
)
from gpuledger.schema.pricebook import WILDCARD, GpuModelCatalog

DEFAULT_IDLE_THRESHOLD = 0.05
DEFAULT_MIG_SLICES = 7
_EMPTY: Mapping[str, Any] = MappingProxyType({})
# A remainder below this is float noise, not an unallocated part of the GPU.
_REMAINDER_EPS = 1e-12

# --- jobs -------------------------------------------------------------------------------

_MERGED_FIELDS = ("state", *JOB_TAGS, "gpu_uuids", "started_at", "ended_at")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What is known of a job: the merge of its `JobEvent`s (ARCHITECTURE.md §2)."""

    job_id: str
    state: JobState | None = None
    team: str | None = None
    project: str | None = None
    job_type: JobType | None = None
    experiment_id: str | None = None
    model: str | None = None
    environment: str | None = None
    gpu_uuids: tuple[str, ...] = ()
    started_at: float | None = None
    ended_at: float | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    ts: float = 0.0
    """The newest event `ts` merged into this record."""
    field_ts: Mapping[str, float] = field(default_factory=lambda: _EMPTY, hash=False, compare=False)
    """`ts` of the event that set each field (`labels.KEY` per label)."""

    def end(self) -> float:
        """When the job stopped holding its GPUs; +inf while it runs."""
        if self.ended_at is not None:
            return self.ended_at
        if self.state in FINISHED_STATES:  # None is not in it
            return self.field_ts.get("state", self.ts)
        return math.inf

    def holds(self, gpu_uuid: str, t: float) -> bool:
        """True when this job is explicitly allocated `gpu_uuid` at time t (§4.1)."""
        return (
            self.started_at is not None
            and self.started_at <= t < self.end()
            and gpu_uuid in self.gpu_uuids
        )


UNALLOCATED = JobRecord(job_id="")


def _value_of(event: JobEvent, name: str) -> Any:
    value = getattr(event, name)
    if name == "gpu_uuids" and value is not None:
        return tuple(value)
    return value


def merge_job(old: JobRecord | None, event: JobEvent) -> JobRecord:
    """Merge one `JobEvent` into what is known of its job; newer state wins field by field."""
    if old is None:
        old = JobRecord(job_id=event.job_id)
    field_ts = dict(old.field_ts)

    def known_ts(name: str, current: object) -> float:
        # A rebuilt record has no field_ts: its set fields date from the record's ts.
        if name in field_ts:
            return field_ts[name]
        return old.ts if current not in (None, ()) else -math.inf

    changes: dict[str, Any] = {}
    for name in _MERGED_FIELDS:
        value = _value_of(event, name)
        if value is not None and event.ts >= known_ts(name, getattr(old, name)):
            changes[name] = value
            field_ts[name] = event.ts

    if event.labels:
        labels = dict(old.labels)
        for key, value in event.labels.items():
            slot = f"labels.{key}"
            if event.ts >= known_ts(slot, labels.get(key)):
                labels[key] = value
                field_ts[slot] = event.ts
        changes["labels"] = MappingProxyType(labels)

    merged = dataclasses.replace(
        old, **changes, ts=max(old.ts, event.ts), field_ts=MappingProxyType(field_ts)
    )
    if (
        merged.started_at is not None
        and merged.ended_at is not None
        and merged.ended_at < merged.started_at
        and field_ts.get("started_at", -math.inf) > field_ts.get("ended_at", merged.ts)
    ):
        # The job ran again under the same id: its old end does not end the new run.
        field_ts["ended_at"] = field_ts["started_at"]
        merged = dataclasses.replace(merged, ended_at=None, field_ts=MappingProxyType(field_ts))
    return merged


# --- allocation -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Share:
    """The part of one sample's GPU time that goes to one job (`job.job_id == ''`: nobody)."""

    job: JobRecord
    share: float
    allocated: bool


_UNALLOCATED_SHARE = Share(UNALLOCATED, 1.0, False)


def _whole_share(holder: JobRecord) -> Share:
    """`Share(holder, 1.0, True)`, one object per job record."""
    share = _whole_shares.get(id(holder))
    if share is None or share.job is not holder:
        share = Share(holder, 1.0, True)
        if len(_whole_shares) >= _MEMO_LIMIT:
            _whole_shares.clear()
        _whole_shares[id(holder)] = share
    return share


def sole_share(holder: JobRecord) -> list[Share]:
    """What `allocate` answers when `holder` explicitly holds the sample's GPU."""
    return [_whole_share(holder)]


def _explicit_holder(sample: GpuSample, jobs_for_gpu: Iterable[JobRecord]) -> JobRecord | None:
    gpu_uuid, t = sample.gpu_uuid, sample.ts
    best: JobRecord | None = None
    for job in jobs_for_gpu:
        if not job.holds(gpu_uuid, t):
            continue
        # Latest start wins (a new job on a GPU whose old job's end we missed), then job_id.
        if best is None or (-(job.started_at or 0.0), job.job_id) < (
            -(best.started_at or 0.0),
            best.job_id,
        ):
            best = job
    return best


# Memos of the hot loop. Each entry keeps the objects it was made from, so an id() in a key
# cannot be reused while the entry lives; `is` checks make a stale entry a miss, never a hit.
_MEMO_LIMIT = 65_536
_label_jobs: dict[tuple[Any, ...], tuple[JobRecord | None, JobRecord]] = {}
_whole_shares: dict[int, Share] = {}


def _label_job(job_id: str, known: JobRecord | None, labels: list[ProcessLabels]) -> JobRecord:
    """The job named by process labels, its record's fields first, then the labels'.

    Remembered per (job, record, labels): every sample of a labelled job gets the same record.
    """
    key = (job_id, id(known), *labels)
    hit = _label_jobs.get(key)
    if hit is not None and hit[0] is known:
        return hit[1]
    job = _describe_label_job(job_id, known, labels)
    if len(_label_jobs) >= _MEMO_LIMIT:
        _label_jobs.clear()
    _label_jobs[key] = (known, job)
    return job


def _describe_label_job(
    job_id: str, known: JobRecord | None, labels: list[ProcessLabels]
) -> JobRecord:
    def first(name: str) -> Any:
        return next((getattr(lab, name) for lab in labels if getattr(lab, name)), None)

    if known is None:
        return JobRecord(job_id=job_id, **{name: first(name) for name in JOB_TAGS})
    fills = {name: first(name) for name in JOB_TAGS if getattr(known, name) is None}
    fills = {name: value for name, value in fills.items() if value is not None}
    return dataclasses.replace(known, **fills) if fills else known


def allocate(
    sample: GpuSample,
    jobs_for_gpu: Iterable[JobRecord],
    jobs_by_id: Mapping[str, JobRecord],
) -> list[Share]:
    """Who had this sample's GPU (§4.1 and §4.4); the shares add up to 1.

    `jobs_for_gpu`: the jobs whose `gpu_uuids` may list the sample's GPU (others are skipped);
    `jobs_by_id`: known jobs, to describe the jobs found through process labels.
    """
    holder = _explicit_holder(sample, jobs_for_gpu)
    if holder is not None:
        return [_whole_share(holder)]

    processes = sample.processes
    labelled: dict[str, list[int]] = {}
    for i, proc in enumerate(processes):
        if proc.labels.job_id:
            labelled.setdefault(proc.labels.job_id, []).append(i)
    if not labelled:
        return [_UNALLOCATED_SHARE]

    # A GPU's own util_sm says nothing of how its processes split it: when no process
    # reports one, the split falls back to memory, as when they report only zeros.
    denominator = 0.0
    if any(p.util_sm is not None for p in processes):
        weights = [p.util_sm or 0.0 for p in processes]
        denominator = max(sample.util_sm or 0.0, math.fsum(weights))
    if denominator <= 0.0:
        weights = [float(p.mem_used_bytes) for p in processes]
        denominator = max(float(sample.mem_used_bytes), math.fsum(weights))
    if denominator <= 0.0:
        weights = [1.0] * len(processes)
        denominator = float(len(processes))

    shares: list[Share] = []
    for job_id in sorted(labelled):
        indexes = labelled[job_id]
        part = min(1.0, math.fsum(weights[i] for i in indexes) / denominator)
        job = _label_job(job_id, jobs_by_id.get(job_id), [processes[i].labels for i in indexes])
        shares.append(Share(job, part, True))

    remainder = 1.0 - math.fsum(s.share for s in shares)
    if remainder > _REMAINDER_EPS:
        shares.append(Share(UNALLOCATED, remainder, False))
    else:
        # Rounding must not leak: the last job takes exactly what the others leave.
        last = shares[-1]
        rest = math.fsum(s.share for s in shares[:-1])
        shares[-1] = Share(last.job, max(0.0, 1.0 - rest), True)
    return shares


_MIG_SLICES = re.compile(r"\b(\d+)g\.", re.IGNORECASE)
_MIG_COMPUTE = re.compile(r"\b(\d+)c\.", re.IGNORECASE)


def mig_fraction(mig_profile: str | None, gpu_model: str | None, catalog: GpuModelCatalog) -> float:
    """The part of the GPU a MIG instance is: `Ng.*` -> N/slices; 1.0 when not MIG."""
    if not mig_profile:
        return 1.0
    slices = re.search(_MIG_SLICES, mig_profile)
    if slices is None:
        return 1.0
    compute = _MIG_COMPUTE.search(mig_profile)
    used = int(compute.group(1)) if compute else int(slices.group(1))
    total = (catalog.mig_slices(gpu_model) if gpu_model else None) or DEFAULT_MIG_SLICES
    return min(1.0, used / total)


# --- cost rows --------------------------------------------------------------------------


def _split_bytes(total: int, shares: list[Share]) -> list[int]:
    parts = [math.floor(total * s.share) for s in shares[:-1]]
    parts.append(total - sum(parts))
    return parts


# A fact is a row of values this module computed, all of the right type and in range (the
# properties in tests/unit/test_cost.py and test_fast_path.py check them against pydantic's
# own validation): nothing validates them again. These are the places of a sample's own
# measures in a row.
_TS, _UTIL, _MEM, _POWER = AT["ts"], AT["util_sm"], AT["mem_used_bytes"], AT["power_w"]
_COST, _IDLE_COST, _IDLE, _SM = AT["cost_usd"], AT["idle_cost_usd"], AT["idle"], AT["sm_active"]
_NODE = AT["node"]
_IN_ROW_ORDER = operator.itemgetter(*FACT_FIELDS)
# Enum `.value` is a descriptor call; the hot loop reads these plain strings instead (a
# StrEnum member and its value are the same key).
_JOB_TYPE_VALUE: dict[Any, str] = {m: m.value for m in JobType} | {None: ""}


@dataclass(slots=True)
class _RowTemplate:
    """What one GPU's last single-row sample shared with the next: every column but the
    sample's own measures, valid while the inputs it was made from are the same objects."""

    job: JobRecord
    node: NodeInfo | None
    entry: PriceEntry | None
    catalog: GpuModelCatalog
    gpu_name: str
    mig_profile: str | None
    interval_s: float
    share: float
    allocated: bool
    threshold: float
    basis: IdleBasis
    gpu_cost: float
    row: list[Any]

    def fits(
        self,
        sample: GpuSample,
        share: Share,
        node: NodeInfo | None,
        entry: PriceEntry | None,
        catalog: GpuModelCatalog,
        threshold: float,
        basis: IdleBasis,
    ) -> bool:
        """True when this sample's row is the template's but for the sample's measures."""
        return (
            self.job is share.job
            and self.node is node
            and self.entry is entry
            and self.catalog is catalog
            and self.share == share.share
            and self.allocated == share.allocated
            and self.threshold == threshold
            and self.basis is basis
            and self.interval_s == sample.interval_s
            and self.gpu_name == sample.gpu_name
            and self.mig_profile == sample.mig_profile
            and self.row[_NODE] == sample.node
        )

    def row_of(self, sample: GpuSample, share: Share) -> list[Any]:
        util = self.basis.judge(sample.util_sm, sample.sm_active)
        part = share.share
        cost_usd = self.gpu_cost * part
        row = self.row.copy()
        row[_TS] = sample.ts
        row[_UTIL] = sample.util_sm
        row[_MEM] = sample.mem_used_bytes
        row[_POWER] = (sample.power_w or 0.0) * part
        row[_COST] = cost_usd
        row[_IDLE_COST] = 0.0 if util is None else cost_usd * (1.0 - util)
        below_threshold = util is not None and util < self.threshold
        row[_IDLE] = 1 if share.allocated and below_threshold else 0
        row[_SM] = sample.sm_active
        return row


_row_templates: dict[str, _RowTemplate] = {}


def cost_sample(
    sample: GpuSample,
    shares: list[Share],
    *,
    node: NodeInfo | None,
    price_index: PriceIndex,
    catalog: GpuModelCatalog,
    idle_threshold: float = DEFAULT_IDLE_THRESHOLD,
    idle_basis: IdleBasis = IdleBasis.busy_time,
) -> list[list[Any]]:
    """The `cost_facts` rows of one sample (§4.2-4.5), one per share, sign +1: each a list of
    values in `CostFact`'s field order (`ledger/facts.py`)."""
    provider, region, pricing_model = node_place(node)
    gpu_model = catalog.model_for(sample.gpu_name)
    entry: PriceEntry | None = None
    if (node is None or node.usd_per_gpu_hour is None) and gpu_model is not None:
        entry = price_index.lookup(provider, region, gpu_model, pricing_model, sample.ts)
    if len(shares) == 1:
        # Most samples: one row, like the GPU's previous one but for the sample's measures.
        tpl = _row_templates.get(sample.gpu_uuid)
        if tpl is not None and tpl.fits(
            sample, shares[0], node, entry, catalog, idle_threshold, idle_basis
        ):
            return [tpl.row_of(sample, shares[0])]
    rate, missing = gpu_rate(sample.mig_profile, node, entry, gpu_model, catalog)
    base = {
        "v": 1,
        "ts": sample.ts,
        "sign": 1,
        "node": sample.node,
        "gpu_uuid": sample.gpu_uuid,
        "gpu_model": gpu_model if gpu_model is not None else sample.gpu_name,
        "mig_profile": sample.mig_profile or "",
        "provider": provider,
        "region": region,
        "pricing_model": PRICING_VALUE[pricing_model],
        "duration_s": sample.interval_s,
        "util_sm": sample.util_sm,
        "usd_per_gpu_hour": rate,
        "price_missing": missing,
    }
    gpu_cost = rate * sample.interval_s / 3600.0
    rows = _share_rows(sample, shares, base, gpu_cost, idle_threshold, idle_basis)
    if len(shares) == 1:
        if len(_row_templates) >= _MEMO_LIMIT:
            _row_templates.clear()
        share = shares[0]
        _row_templates[sample.gpu_uuid] = _RowTemplate(
            share.job,
            node,
            entry,
            catalog,
            sample.gpu_name,
            sample.mig_profile,
            sample.interval_s,
            share.share,
            share.allocated,
            idle_threshold,
            idle_basis,
            gpu_cost,
            rows[0].copy(),
        )
    return rows


def node_place(node: NodeInfo | None) -> tuple[str, str, PricingModel]:
    """Where a node's GPUs are priced: its provider, region and pricing model (a node never
    described: any place, on demand)."""
    if node is None:
        return WILDCARD, WILDCARD, PricingModel.on_demand
    return node.provider, node.region, node.pricing_model


def gpu_rate(
    mig_profile: str | None,
    node: NodeInfo | None,
    entry: PriceEntry | None,
    gpu_model: str | None,
    catalog: GpuModelCatalog,
) -> tuple[float, int]:
    """The GPU's (or MIG instance's) USD per hour, and 1 when no price was found."""
    usd_per_gpu_hour: float | None = None
    if node is not None and node.usd_per_gpu_hour is not None:
        usd_per_gpu_hour = node.usd_per_gpu_hour
    elif entry is not None:
        usd_per_gpu_hour = entry.usd_per_gpu_hour
    rate = 0.0 if usd_per_gpu_hour is None else usd_per_gpu_hour
    if mig_profile:
        rate *= mig_fraction(mig_profile, gpu_model, catalog)
    return rate, 1 if usd_per_gpu_hour is None else 0


def _share_rows(
    sample: GpuSample,
    shares: list[Share],
    base: dict[str, Any],
    gpu_cost: float,
    idle_threshold: float,
    idle_basis: IdleBasis,
) -> list[list[Any]]:
    """Each share's row: its values in the model's field order."""
    util_sm = sample.util_sm
    util = idle_basis.judge(sample.util_sm, sample.sm_active)
    below_threshold = util is not None and util < idle_threshold
    power_w = sample.power_w or 0.0
    if len(shares) == 1:
        mem_parts = [sample.mem_used_bytes]
    else:
        mem_parts = _split_bytes(sample.mem_used_bytes, shares)
    rows = []
    for share, mem_used_bytes in zip(shares, mem_parts, strict=True):
        job = share.job
        part = share.share
        cost_usd = gpu_cost * part
        allocated = share.allocated
        values = {
            "v": 1,
            "ts": base["ts"],
            "sign": 1,
            "node": base["node"],
            "gpu_uuid": base["gpu_uuid"],
            "gpu_model": base["gpu_model"],
            "mig_profile": base["mig_profile"],
            "job_id": job.job_id,
            "team": job.team or "",
            "project": job.project or "",
            "job_type": _JOB_TYPE_VALUE[job.job_type],
            "experiment_id": job.experiment_id or "",
            "provider": base["provider"],
            "region": base["region"],
            "pricing_model": base["pricing_model"],
            "duration_s": base["duration_s"],
            "share": part,
            "util_sm": util_sm,
            "mem_used_bytes": mem_used_bytes,
            "power_w": power_w * part,
            "usd_per_gpu_hour": base["usd_per_gpu_hour"],
            "cost_usd": cost_usd,
            "idle_cost_usd": 0.0 if util is None else cost_usd * (1.0 - util),
            "allocated": 1 if allocated else 0,
            "idle": 1 if allocated and below_threshold else 0,
            "price_missing": base["price_missing"],
            "sm_active": sample.sm_active,
            "model": job.model or "",
            "environment": job.environment or "",
        }
        rows.append(list(_IN_ROW_ORDER(values)))
    return rows
