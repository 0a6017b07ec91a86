"""What every recommendation is made of: the kinds, the thresholds, the rows the store gives
(job profiles, hourly demand, endpoint hours), a recommendation and how one is built, and the
GPUs a job could move to at the price book's rates. `recommend` and `oversized` decide with
them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from gpuledger.analysts.prices import GB, GpuSpec, epoch
from gpuledger.analysts.window import Window, as_utc
from gpuledger.ledger.prices import PriceIndex
from gpuledger.schema.messages import PriceEntry
from gpuledger.schema.pricebook import WILDCARD, GpuModelCatalog


class Kind(StrEnum):
    rightsize = "rightsize"
    spot = "spot"
    reserved = "reserved"
    scale_to_zero = "scale_to_zero"
    oversized = "oversized"  # a flag: more GPU held than used (analysts/oversized.py)


@dataclass(frozen=True)
class Thresholds:
    """What counts as a fit and as worth saying (the defaults of `gpuledger recommend`)."""

    memory_headroom: float = 1.2  # peak memory x this must fit the smaller GPU
    compute_headroom: float = 1.25  # p95 utilization x this must fit its compute
    min_gpu_hours: float = 1.0  # jobs with less GPU time in the window are not judged
    min_saving_fraction: float = 0.05  # a move must save at least this part of the rate
    spot_min_run_hours: float = 1.0  # "ran long without a failure"
    idle_endpoint_min_hours: int = 2  # hours without a request before scale-to-zero is said
    batch_job_types: frozenset[str] = frozenset({"training", "tuning", "data_processing"})
    # Instance-type guardrails: inference below this share of its GPU's memory for this many
    # days, and notebooks holding at least a whole node of this many GPUs, are flagged.
    oversized_memory_share: float = 0.2
    oversized_min_days: float = 7.0
    whole_node_gpus: int = 8


DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class JobProfile:
    """One row of the `job_resource_profile` view."""

    job_id: str
    team: str
    project: str
    job_type: str
    experiment_id: str
    state: str
    started_at: datetime | None
    ended_at: datetime | None
    labels: dict[str, str]
    gpu_model: str
    mig_profile: str
    provider: str
    region: str
    pricing_model: str
    gpus: int
    first_ts: datetime
    last_ts: datetime
    gpu_seconds: float
    gpu_hours: float
    cost_usd: float
    idle_cost_usd: float
    peak_mem_bytes: int
    p95_util_sm: float | None
    max_util_sm: float | None
    mean_util_sm: float | None

    @property
    def charged_rate(self) -> float:
        """What one GPU-hour (of the instance, for MIG) of this job cost on average."""
        return self.cost_usd / self.gpu_hours if self.gpu_hours > 0 else 0.0

    @property
    def run_hours(self) -> float:
        if self.started_at is not None and self.ended_at is not None:
            return (as_utc(self.ended_at) - as_utc(self.started_at)).total_seconds() / 3600
        return self.gpu_hours / max(self.gpus, 1)

    @property
    def checkpoints(self) -> bool:
        flag = self.labels.get("checkpoint") or self.labels.get("checkpointing") or ""
        return flag.strip().lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class DemandHour:
    """One row of the `gpu_hourly_demand` view."""

    hour: datetime
    provider: str
    region: str
    gpu_model: str
    mig_profile: str
    pricing_model: str
    gpus: float
    cost_usd: float


@dataclass(frozen=True)
class EndpointHour:
    """One row of the `endpoint_hourly` view."""

    job_id: str
    hour: datetime
    team: str
    project: str
    cost_usd: float
    gpu_seconds: float
    idle_cost_usd: float
    requests: int
    tokens: int


@dataclass(frozen=True)
class Recommendation:
    kind: Kind
    subject: str
    team: str
    project: str
    current: str
    proposed: str
    window_saving_usd: float
    monthly_saving_usd: float
    risk: str
    detail: str = ""
    numbers: dict[str, float] = field(default_factory=dict, compare=False)


def advice(
    kind: Kind,
    profile: JobProfile,
    window: Window,
    saving: float,
    *,
    current: str,
    proposed: str,
    risk: str,
    detail: str,
    numbers: dict[str, float],
) -> Recommendation:
    """A recommendation about one job: its saving in the window, and scaled to 30 days."""
    return Recommendation(
        kind=kind,
        subject=profile.job_id,
        team=profile.team,
        project=profile.project,
        current=current,
        proposed=proposed,
        window_saving_usd=saving,
        monthly_saving_usd=saving * window.to_month,
        risk=risk,
        detail=detail,
        numbers=numbers,
    )


def market_price(
    prices: PriceIndex, provider: str, region: str, gpu_model: str, pricing_model: str, at: float
) -> PriceEntry | None:
    """The book's price where the job runs (§4.2 lookup), but only from its own provider: a
    `*`/`*` fallback row may price a GPU that provider does not sell, so it counts only for a
    node whose provider is unknown (`*`) itself."""
    entry = prices.lookup(provider, region, gpu_model, pricing_model, at)
    if entry is None or (entry.provider != provider and provider != WILDCARD):
        return None
    return entry


@dataclass(frozen=True)
class _Candidate:
    label: str
    usd_per_gpu_hour: float
    tflops: float
    memory_bytes: float
    same_model: bool
    price_from: str


@dataclass(frozen=True)
class Basis:
    """What a window's recommendations are judged by: the price book, the GPU specs, the
    catalogue's MIG slices, the window itself and the thresholds."""

    prices: PriceIndex
    specs: dict[str, GpuSpec]
    catalog: GpuModelCatalog
    window: Window
    thresholds: Thresholds = DEFAULT_THRESHOLDS

    def candidates(self, profile: JobProfile, spec: GpuSpec) -> Iterable[_Candidate]:
        """The GPUs, and slices of the job's own GPU, that it could run on instead."""
        at = epoch(profile.last_ts)
        slices = self.catalog.mig_slices(profile.gpu_model)
        # MIG instances have no NVLink between them: offer slices to single-GPU jobs only.
        if slices and profile.gpus == 1:
            for mig in spec.mig_profiles:
                if mig.slices >= slices:
                    continue
                fraction = mig.slices / slices
                yield _Candidate(
                    label=f"{profile.gpu_model} MIG {mig.name}",
                    usd_per_gpu_hour=profile.charged_rate * fraction,
                    tflops=spec.tflops * fraction,
                    memory_bytes=mig.memory_gb * GB,
                    same_model=True,
                    price_from=f"{mig.slices}/{slices} of the rate charged now",
                )
        for other in self.specs.values():
            if other.gpu_model == profile.gpu_model:
                continue
            entry = market_price(
                self.prices,
                profile.provider,
                profile.region,
                other.gpu_model,
                profile.pricing_model,
                at,
            )
            if entry is None:
                continue
            yield _Candidate(
                label=other.gpu_model,
                usd_per_gpu_hour=entry.usd_per_gpu_hour,
                tflops=other.tflops,
                memory_bytes=other.memory_bytes,
                same_model=False,
                price_from=(
                    f"price book {entry.provider}/{entry.region} {entry.pricing_model.value}"
                ),
            )

    def fitting(
        self, profile: JobProfile, spec: GpuSpec, *, tflops: float, memory_bytes: float
    ) -> list[_Candidate]:
        """The candidates with at least this compute and this memory."""
        return [
            c
            for c in self.candidates(profile, spec)
            if c.tflops >= tflops and c.memory_bytes >= memory_bytes
        ]


# One decision about one job profile: a recommendation, or None.
Rule = Callable[[JobProfile, Basis], Recommendation | None]


def each_profile(
    rules: Sequence[Rule], profiles: Iterable[JobProfile], basis: Basis
) -> list[Recommendation]:
    """What each rule finds in each profile, profile by profile."""
    return [
        found
        for profile in profiles
        for rule in rules
        if (found := rule(profile, basis)) is not None
    ]
