"""The messages of ARCHITECTURE.md §2: the only definition of what travels on the topics.

Strict about what matters (fractions in 0..1, money >= 0, enums, schema version `v`),
tolerant of extra fields so that a newer sender does not break an older worker.

The contract is bounded, so that no message that passes it can fail later in the worker or
the store:

- every float is finite: NaN and ±Infinity (which JSON parsers accept, and `1e999` reads as)
  are refused everywhere (`allow_inf_nan=False` on every model);
- every time is an epoch second in `[EPOCH_MIN_S, EPOCH_MAX_S)`, 1970-01-01 to
  2100-01-01 UTC, which the store's `DateTime64(3)` columns hold to the millisecond; a time
  in milliseconds or nanoseconds is refused, the refusal naming the bound it broke;
- counts and bytes fit their columns (`UInt64` for bytes, requests and tokens, `UInt32` for
  process ids and GPU indexes);
- label values (job ids, teams, projects, experiments, process and container names, job
  labels) are normalised, never refused: control characters are removed and the value cut
  to `LABEL_MAX_CHARS`, and `LABEL_NORMALISATIONS` counts how many were changed. A weird
  label must not cost anyone their dollars.

The fast decoder (`streams/decode.py`) reuses these constants.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

EPOCH_MIN_S = 0.0
"""The earliest time a message may carry: 1970-01-01T00:00:00Z (0 = "always" for prices)."""
EPOCH_MAX_S = 4_102_444_800.0
"""The first time a message may not carry: 2100-01-01T00:00:00Z. A time in milliseconds
(1.7e12) or nanoseconds (1.7e18) is beyond it."""
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
LABEL_MAX_CHARS = 256
"""Label values are cut to this many characters (they become ClickHouse columns)."""
CONTROL_CHARACTERS = "\x00-\x1f\x7f-\x9f"
"""Unicode's control characters (category Cc), as a regular-expression class body."""
_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")

FINITE = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
"""Every model's configuration: extra fields ignored, frozen, finite floats only."""

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Bytes = Annotated[int, Field(ge=0, le=UINT64_MAX)]
Count = Annotated[int, Field(ge=0, le=UINT64_MAX)]
Index = Annotated[int, Field(ge=0, le=UINT32_MAX)]
EpochSeconds = Annotated[float, Field(ge=EPOCH_MIN_S, lt=EPOCH_MAX_S)]
"""A time: epoch seconds in [1970-01-01, 2100-01-01) UTC."""
# Identities (nodes, GPUs, providers) become ClickHouse columns: bound their length.
Label = Annotated[str, Field(max_length=LABEL_MAX_CHARS)]


class _Tally:
    """How many label values were normalised in this process (read by the worker's stats)."""

    def __init__(self) -> None:
        self.count = 0


LABEL_NORMALISATIONS = _Tally()


def normalise_label(value: str) -> str:
    """A label value without control characters, cut to `LABEL_MAX_CHARS` (counted when
    that changed it)."""
    clean = _CONTROL.sub("", value)[:LABEL_MAX_CHARS]
    if clean != value:
        LABEL_NORMALISATIONS.count += 1
    return clean


LabelValue = Annotated[str, AfterValidator(normalise_label)]
"""A label value: normalised by `normalise_label`, never refused."""


def _job_id(value: str) -> str:
    clean = normalise_label(value)
    if not clean:
        raise ValueError(
            f"job_id must have a character that is not a control character, got {value[:40]!r}"
        )
    return clean


JobId = Annotated[str, AfterValidator(_job_id)]
"""A job's id: normalised like a label value, and not empty."""


class Message(BaseModel):
    """Base of every message: schema version 1, extra fields kept but ignored."""

    model_config = FINITE

    v: Literal[1] = 1  # SCHEMA_VERSION; a literal so that mypy sees the type


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


class IdleBasis(StrEnum):
    """Which utilization decides idleness: NVML's busy time (`util_sm`, the share of time any
    kernel ran) or GPM's SM activity (the share of SMs busy; the busy time where a GPU has no
    GPM)."""

    busy_time = "busy_time"
    sm_active = "sm_active"

    def judge(self, util_sm: float | None, sm_active: float | None) -> float | None:
        """The utilization this basis judges: the SM activity where it asks for it and the GPU
        measures it, else the busy time."""
        if self is IdleBasis.sm_active and sm_active is not None:
            return sm_active
        return util_sm


class PricingModel(StrEnum):
    on_demand = "on_demand"
    spot = "spot"
    reserved = "reserved"


class ProcessLabels(BaseModel):
    """Job metadata an agent found for a process (environment, pod labels)."""

    model_config = FINITE

    job_id: LabelValue | None = None
    team: LabelValue | None = None
    project: LabelValue | None = None
    job_type: JobType | None = None
    experiment_id: LabelValue | None = None
    model: LabelValue | None = None
    environment: LabelValue | None = None


JOB_TAGS: tuple[str, ...] = tuple(name for name in ProcessLabels.model_fields if name != "job_id")
"""What a job is tagged with besides its id (team, project, job type, ...): the fields of
`ProcessLabels` that `JobEvent` carries too."""


class ProcessSample(BaseModel):
    model_config = FINITE

    pid: Index
    name: LabelValue = ""
    util_sm: Fraction | None = None
    mem_used_bytes: Bytes = 0
    container_id: LabelValue | None = None
    pod_uid: LabelValue | None = None
    labels: ProcessLabels = ProcessLabels()


class GpuSample(Message):
    """One GPU (or MIG instance) over `[ts, ts + interval_s)`."""

    ts: EpochSeconds
    node: Label
    gpu_uuid: Annotated[str, Field(min_length=1, max_length=128)]
    gpu_index: Index = 0
    gpu_name: Label
    mig_profile: Label | None = None
    interval_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 1.0
    util_sm: Fraction | None = None
    """NVML's busy time: the share of the interval in which any kernel ran. A MIG instance
    has none from NVML; the agent gives it the instance's SM activity."""
    util_mem: Fraction | None = None
    mem_used_bytes: Bytes = 0
    mem_total_bytes: Bytes = 0
    # GPU Performance Monitoring (NVML GPM, Hopper and later) over the interval; None where
    # the GPU has no GPM. SM activity: the share of SMs busy, averaged over the interval.
    sm_active: Fraction | None = None
    sm_occupancy: Fraction | None = None
    tensor_active: Fraction | None = None
    dram_active: Fraction | None = None
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

    ts: EpochSeconds
    job_id: JobId
    state: JobState | None = None
    team: LabelValue | None = None
    project: LabelValue | None = None
    job_type: JobType | None = None
    experiment_id: LabelValue | None = None
    model: LabelValue | None = None  # what the job trains or serves, e.g. "llama-3-70b"
    environment: LabelValue | None = None  # e.g. "prod", "staging", "dev"
    gpu_uuids: list[Label] | None = None
    started_at: EpochSeconds | None = None
    ended_at: EpochSeconds | None = None
    labels: dict[LabelValue, LabelValue] | None = None


class PriceEntry(Message):
    provider: Label
    region: Label
    gpu_model: Annotated[str, Field(min_length=1, max_length=64)]
    pricing_model: PricingModel
    usd_per_gpu_hour: NonNegative
    effective_from: EpochSeconds = 0.0

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
    ts: EpochSeconds
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

    ts: EpochSeconds
    job_id: JobId
    requests: Count = 0
    tokens: Count = 0
    source: LabelValue = ""


class CostFact(Message):
    """One row of `cost_facts` (ARCHITECTURE.md §4)."""

    ts: EpochSeconds
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
    sm_active: Fraction | None = None
    model: str = ""
    environment: str = ""


class AlertKind(StrEnum):
    idle_allocated_gpu = "idle_allocated_gpu"
    budget_burn = "budget_burn"
    orphaned_gpu_memory = "orphaned_gpu_memory"


class AlertState(StrEnum):
    firing = "firing"
    resolved = "resolved"


class Alert(Message):
    ts: EpochSeconds
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
    budgets; `pid N` for orphaned GPU memory (one alert per process); '' for idle alerts
    (optional: consumers may ignore it)."""


class DeadLetter(BaseModel):
    """The dead-letter envelope: the original bytes and why they were refused."""

    model_config = FINITE

    value_b64: str
    error: str
    topic: str
    partition: int
    offset: int
    ts: float
    index: int | None = None


_Model = TypeVar("_Model", bound=BaseModel)
_new_object = object.__new__
_set_attribute = object.__setattr__


def assembler(model: type[_Model]) -> Callable[[dict[str, Any]], _Model]:
    """A builder of `model`s from values (every field, in the model's order) that validates
    nothing: for hot loops whose values were computed in range (their tests check them
    against validation). It builds what `model_construct` builds, minus its per-field
    bookkeeping: 0.6 µs where validation costs 1-4 µs."""
    if (
        model.__pydantic_post_init__
        or model.__private_attributes__
        or model.model_config.get("extra") == "allow"
    ):  # what model_construct would do besides setting the four slots below
        raise TypeError(f"{model.__name__} needs post-init or extras: validate it")
    fields_set = frozenset(model.model_fields)

    def assemble(values: dict[str, Any]) -> _Model:
        instance: _Model = _new_object(model)
        _set_attribute(instance, "__dict__", values)
        _set_attribute(instance, "__pydantic_fields_set__", fields_set)
        _set_attribute(instance, "__pydantic_extra__", None)
        _set_attribute(instance, "__pydantic_private__", None)
        return instance

    return assemble
