"""The messages of DESIGN.md §3: the only definition of what travels on the topics.

Strict about what matters (fractions in 0..1, money >= 0, enums, schema version `v`),
tolerant of extra fields so that a newer sender does not break an older worker.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Bytes = Annotated[int, Field(ge=0)]
# Label values become ClickHouse columns: bound their length before they do.
Label = Annotated[str, Field(max_length=256)]


class Message(BaseModel):
    """Base of every message: schema version 1, extra fields kept but ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1  # SCHEMA_VERSION; a literal so that mypy sees the type

    @field_validator("ts", check_fields=False)
    @classmethod
    def _finite_ts(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"ts must be a finite epoch second >= 0, got {value!r}")
        return value


class JobState(StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    preempted = "preempted"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset(
    {JobState.succeeded, JobState.failed, JobState.preempted, JobState.cancelled}
)


class JobType(StrEnum):
    training = "training"
    inference = "inference"
    tuning = "tuning"
    data_processing = "data_processing"
    notebook = "notebook"
    other = "other"


class PricingModel(StrEnum):
    on_demand = "on_demand"
    spot = "spot"
    reserved = "reserved"


class ProcessLabels(BaseModel):
    """Job metadata an agent found for a process (environment, pod labels)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: Label | None = None
    team: Label | None = None
    project: Label | None = None
    job_type: JobType | None = None
    experiment_id: Label | None = None


class ProcessSample(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    pid: Annotated[int, Field(ge=0)]
    name: Label = ""
    util_sm: Fraction | None = None
    mem_used_bytes: Bytes = 0
    container_id: Label | None = None
    pod_uid: Label | None = None
    labels: ProcessLabels = ProcessLabels()


class GpuSample(Message):
    """One GPU (or MIG instance) over `[ts, ts + interval_s)`."""

    ts: float
    node: Label
    gpu_uuid: Annotated[str, Field(min_length=1, max_length=128)]
    gpu_index: Annotated[int, Field(ge=0)] = 0
    gpu_name: Label
    mig_profile: Label | None = None
    interval_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 1.0
    util_sm: Fraction | None = None
    util_mem: Fraction | None = None
    mem_used_bytes: Bytes = 0
    mem_total_bytes: Bytes = 0
    power_w: NonNegative | None = None
    power_limit_w: NonNegative | None = None
    temp_c: float | None = None
    processes: list[ProcessSample] = []


class SampleBatch(Message):
    """What one node read in one interval (or several, when a spool drains).

    Samples are kept raw here so that one bad sample does not sink its batch: the worker
    validates each with `GpuSample` and dead-letters only those that fail.
    """

    node: Label
    samples: list[dict[str, Any]]


class JobEvent(Message):
    """A job's full state, or the fields that changed (absent = unchanged)."""

    ts: float
    job_id: Annotated[str, Field(min_length=1, max_length=256)]
    state: JobState | None = None
    team: Label | None = None
    project: Label | None = None
    job_type: JobType | None = None
    experiment_id: Label | None = None
    gpu_uuids: list[Label] | None = None
    started_at: float | None = None
    ended_at: float | None = None
    labels: dict[Label, Label] | None = None


class PriceEntry(Message):
    provider: Label
    region: Label
    gpu_model: Annotated[str, Field(min_length=1, max_length=64)]
    pricing_model: PricingModel
    usd_per_gpu_hour: NonNegative
    effective_from: NonNegative = 0.0

    @property
    def key(self) -> str:
        return "/".join(
            (
                self.provider,
                self.region,
                self.gpu_model,
                self.pricing_model.value,
                repr(self.effective_from),
            )
        )


class NodeInfo(Message):
    ts: float
    node: Label
    provider: Label = "*"
    region: Label = "*"
    instance_type: Label = ""
    pricing_model: PricingModel = PricingModel.on_demand
    usd_per_gpu_hour: NonNegative | None = None


class UsageEvent(Message):
    """Inference volume one reporter of a job served since its previous event.

    Identity: an event is identified by (`job_id`, `source`, `ts` to the millisecond).
    `source` names the reporter (a replica, pod or host of the endpoint; "" when the job has
    one reporter or the sender predates the field). Two replicas reporting the same second
    are two events and both count; an event sent again (an agent retrying, a replay, the same
    events consumed in other batches) has the identity of one already stored and counts
    once, the first stored winning whatever the values of the copy. Replicas of one job that
    report without a `source` must not stamp the same millisecond.
    """

    ts: float
    job_id: Annotated[str, Field(min_length=1, max_length=256)]
    requests: Annotated[int, Field(ge=0)] = 0
    tokens: Annotated[int, Field(ge=0)] = 0
    source: Label = ""


class CostFact(Message):
    """One row of `cost_facts` (DESIGN.md §5)."""

    ts: float
    sign: Literal[1, -1] = 1
    node: str
    gpu_uuid: str
    gpu_model: str
    mig_profile: str = ""
    job_id: str = ""
    team: str = ""
    project: str = ""
    job_type: str = ""
    experiment_id: str = ""
    provider: str = "*"
    region: str = "*"
    pricing_model: str = PricingModel.on_demand.value
    duration_s: float
    share: Fraction
    util_sm: Fraction | None = None
    mem_used_bytes: Bytes = 0
    power_w: float = 0.0
    usd_per_gpu_hour: NonNegative
    cost_usd: NonNegative
    idle_cost_usd: NonNegative
    allocated: Literal[0, 1]
    idle: Literal[0, 1]
    price_missing: Literal[0, 1]


class AlertKind(StrEnum):
    idle_allocated_gpu = "idle_allocated_gpu"
    budget_burn = "budget_burn"


class AlertState(StrEnum):
    firing = "firing"
    resolved = "resolved"


class Alert(Message):
    ts: float
    kind: AlertKind
    state: AlertState
    gpu_uuid: str = ""
    node: str = ""
    job_id: str = ""
    team: str = ""
    project: str = ""
    since: float
    idle_seconds: NonNegative = 0.0
    wasted_usd: NonNegative = 0.0
    message: str = ""
    rule: str = ""
    """Which rule of its scope raised it: `mtd_50`, `mtd_80`, `mtd_100`, `burn_rate` for
    budgets; '' for idle alerts (added after DESIGN.md §3's list: consumers may ignore it)."""


class DeadLetter(BaseModel):
    """The dead-letter envelope: the original bytes and why they were refused."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    value_b64: str
    error: str
    topic: str
    partition: int
    offset: int
    ts: float
    index: int | None = None
