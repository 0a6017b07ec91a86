"""Recommendations with dollars: right-sizing, spot, reserved baseline, idle endpoints, and
the instance-type guardrails' flags (`oversized`).

Every decision is a pure function of what the store measured in a window (job profiles,
hourly GPU demand, endpoint hours), the price book and the GPU specs. Savings are what the
window would have cost less, scaled to 30 days ("if the pattern goes on"); savings of
different kinds on the same subject overlap and must not be added up.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpuledger.analysts.findings import (
    Basis,
    DemandHour,
    EndpointHour,
    JobProfile,
    Kind,
    Recommendation,
    advice,
    each_profile,
    market_price,
)
from gpuledger.analysts.oversized import oversized
from gpuledger.analysts.prices import GB, epoch
from gpuledger.analysts.window import as_utc
from gpuledger.ledger.cost import mig_fraction
from gpuledger.output import money


def _rate(usd: float) -> str:
    return f"${usd:,.4g}/GPU-h"


# -- right-sizing ---------------------------------------------------------------------------


def rightsize(profile: JobProfile, basis: Basis) -> Recommendation | None:
    """A cheaper GPU (or MIG slice of the same one) that the job's p95 utilization and peak
    memory fit with headroom; None when there is none or the job cannot be judged."""
    thresholds = basis.thresholds
    spec = basis.specs.get(profile.gpu_model)
    if (
        spec is None
        or profile.mig_profile
        or profile.p95_util_sm is None
        or profile.gpu_hours < thresholds.min_gpu_hours
        or profile.charged_rate <= 0
    ):
        return None
    need_tflops = profile.p95_util_sm * spec.tflops * thresholds.compute_headroom
    need_bytes = profile.peak_mem_bytes * thresholds.memory_headroom
    fits = basis.fitting(profile, spec, tflops=need_tflops, memory_bytes=need_bytes)
    if not fits:
        return None
    best = min(fits, key=lambda c: (c.usd_per_gpu_hour, not c.same_model, c.label))
    current = profile.charged_rate
    if best.usd_per_gpu_hour > current * (1 - thresholds.min_saving_fraction):
        return None
    saving = (current - best.usd_per_gpu_hour) * profile.gpu_hours
    risk = (
        "low: the same GPU model, cut to a slice that fits p95 utilization and peak memory "
        "with headroom"
        if best.same_model
        else "medium: compute is compared by dense FP16/BF16 TFLOPS only; memory bandwidth "
        "and interconnect differ, so benchmark the job on the smaller GPU first"
    )
    return advice(
        Kind.rightsize,
        profile,
        basis.window,
        saving,
        current=(
            f"{profile.gpus} x {profile.gpu_model} {profile.pricing_model} at "
            f"{_rate(current)}; p95 util {profile.p95_util_sm:.0%}, peak memory "
            f"{profile.peak_mem_bytes / GB:.1f} GB"
        ),
        proposed=f"{profile.gpus} x {best.label} at {_rate(best.usd_per_gpu_hour)}",
        risk=risk,
        detail=(
            f"needs {need_tflops:,.0f} TFLOPS and {need_bytes / GB:.1f} GB with headroom; "
            f"{best.label} has {best.tflops:,.0f} TFLOPS and {best.memory_bytes / GB:.0f} GB "
            f"({best.price_from}); {profile.gpu_hours:.1f} GPU-hours in the window"
        ),
        numbers={"current_rate": current, "proposed_rate": best.usd_per_gpu_hour},
    )


# -- spot ------------------------------------------------------------------------------------

SPOT_NOTICE = "spot capacity can be reclaimed at short notice (AWS: 2 minutes, GCP and Azure: 30 s)"


def spot(profile: JobProfile, basis: Basis) -> Recommendation | None:
    """Spot for an on-demand batch job that checkpoints or ran long without a failure."""
    thresholds = basis.thresholds
    if (
        profile.pricing_model != "on_demand"
        or profile.job_type not in thresholds.batch_job_types
        or profile.gpu_hours < thresholds.min_gpu_hours
    ):
        return None
    clean_long_run = (
        profile.state == "succeeded" and profile.run_hours >= thresholds.spot_min_run_hours
    )
    if not (profile.checkpoints or clean_long_run):
        return None
    entry = market_price(
        basis.prices,
        profile.provider,
        profile.region,
        profile.gpu_model,
        "spot",
        epoch(profile.last_ts),
    )
    if entry is None:
        return None
    spot_rate = entry.usd_per_gpu_hour * mig_fraction(
        profile.mig_profile, profile.gpu_model, basis.catalog
    )
    current = profile.charged_rate
    if spot_rate > current * (1 - thresholds.min_saving_fraction):
        return None
    saving = (current - spot_rate) * profile.gpu_hours
    if profile.checkpoints:
        risk = (
            "low: the job checkpoints (label checkpoint=true), so a preemption loses only "
            f"the work since the last checkpoint; {SPOT_NOTICE}"
        )
    else:
        risk = (
            f"medium: it ran {profile.run_hours:.1f} h and succeeded, but has no checkpoint "
            f"label: a preemption restarts it from the start; add checkpoints first; "
            f"{SPOT_NOTICE}"
        )
    what = profile.gpu_model + (f" MIG {profile.mig_profile}" if profile.mig_profile else "")
    return advice(
        Kind.spot,
        profile,
        basis.window,
        saving,
        current=f"{profile.gpus} x {what} on_demand at {_rate(current)}",
        proposed=f"{profile.gpus} x {what} spot at {_rate(spot_rate)}",
        risk=risk,
        detail=(
            f"{profile.job_type} job, {profile.state or 'state unknown'}; spot price from the "
            f"price book ({entry.provider}/{entry.region}); {profile.gpu_hours:.1f} GPU-hours "
            "in the window"
        ),
        numbers={"current_rate": current, "proposed_rate": spot_rate},
    )


# -- reserved --------------------------------------------------------------------------------


def best_commitment(
    demand: Sequence[float], od_rate: float, reserved_rate: float
) -> tuple[int, float]:
    """The number of GPUs to reserve that saves most over hourly `demand` (GPUs busy per
    hour, one value per hour of the window, zeros included), and that saving.

    Reserving B GPUs costs B x reserved_rate every hour and saves od_rate for each busy GPU
    up to B: saving(B) = od_rate x Σ min(d, B) − reserved_rate x B x hours.
    """
    if not demand or reserved_rate >= od_rate:
        return 0, 0.0
    best_gpus, best_saving = 0, 0.0
    for gpus in range(1, math.ceil(max(demand) + 1e-9) + 1):
        covered = sum(min(d, gpus) for d in demand)
        saving = od_rate * covered - reserved_rate * gpus * len(demand)
        if saving > best_saving + 1e-9:
            best_gpus, best_saving = gpus, saving
    return best_gpus, best_saving


def reserved(demand: Iterable[DemandHour], basis: Basis) -> list[Recommendation]:
    """A reserved baseline per (provider, region, GPU model) of on-demand GPU time."""
    window = basis.window
    hours = max(1, round(window.hours))
    start = window.start.replace(minute=0, second=0, microsecond=0)
    series: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0] * hours)
    for row in demand:
        if row.pricing_model != "on_demand":
            continue
        slot = int((as_utc(row.hour) - start).total_seconds() // 3600)
        if 0 <= slot < hours:
            fraction = mig_fraction(row.mig_profile, row.gpu_model, basis.catalog)
            series[(row.provider, row.region, row.gpu_model)][slot] += row.gpus * fraction
    at = window.end.timestamp()
    found: list[Recommendation] = []
    for (provider, region, model), used in sorted(series.items()):
        od = market_price(basis.prices, provider, region, model, "on_demand", at)
        res = market_price(basis.prices, provider, region, model, "reserved", at)
        if od is None or res is None:
            continue
        od_rate, res_rate = od.usd_per_gpu_hour, res.usd_per_gpu_hour
        gpus, saving = best_commitment(used, od_rate, res_rate)
        if gpus == 0:
            continue
        busy = sum(1 for d in used if d >= gpus - 1e-9) / len(used)
        found.append(
            Recommendation(
                kind=Kind.reserved,
                subject=f"{provider}/{region}/{model}",
                team="",
                project="",
                current=(
                    f"{model} on_demand at {_rate(od_rate)}: {sum(used) / len(used):.2f} GPUs "
                    f"busy on average, {gpus} or more in {busy:.0%} of the hours"
                ),
                proposed=f"reserve {gpus} x {model} at {_rate(res_rate)}",
                window_saving_usd=saving,
                monthly_saving_usd=saving * window.to_month,
                risk=(
                    "a commitment is paid whether used or not: it pays off while "
                    f"{gpus} GPUs stay busy more than {res_rate / od_rate:.0%} of the hours; "
                    "the price book's reserved rate is used as is (the packaged book's "
                    "reserved rows are 1-year terms; load 3-year rates to compare those)"
                ),
                detail=f"{len(used)} hours in the window; prices from the price book "
                f"({res.provider}/{res.region})",
                numbers={"gpus": float(gpus), "od_rate": od_rate, "reserved_rate": res_rate},
            )
        )
    return found


# -- idle inference endpoints ----------------------------------------------------------------


def idle_endpoints(hours: Iterable[EndpointHour], basis: Basis) -> list[Recommendation]:
    """Inference endpoints that paid for GPU hours without a single request."""
    by_job: dict[str, list[EndpointHour]] = defaultdict(list)
    for row in hours:
        by_job[row.job_id].append(row)
    found: list[Recommendation] = []
    for job_id, rows in sorted(by_job.items()):
        idle = [r for r in rows if r.requests == 0 and r.cost_usd > 1e-12]
        if len(idle) < basis.thresholds.idle_endpoint_min_hours:
            continue
        idle_cost = sum(r.cost_usd for r in idle)
        requests = sum(r.requests for r in rows)
        latest = max(rows, key=lambda r: r.hour)
        proposed = (
            "no request in the whole window: scale it to zero or retire it"
            if requests == 0
            else "scale to zero after an hour without requests, and back up on demand"
        )
        found.append(
            Recommendation(
                kind=Kind.scale_to_zero,
                subject=job_id,
                team=latest.team,
                project=latest.project,
                current=(
                    f"{len(rows)} GPU-paid hours served {requests:,} requests; "
                    f"{len(idle)} hours had none and cost {money(idle_cost)}"
                ),
                proposed=proposed,
                window_saving_usd=idle_cost,
                monthly_saving_usd=idle_cost * basis.window.to_month,
                risk=(
                    "low to medium: the first request after a scale-to-zero waits for a cold "
                    "start (loading the model, often tens of seconds)"
                ),
                detail="idle hour = an hour with GPU cost and zero requests in the usage table",
                numbers={"idle_hours": float(len(idle)), "requests": float(requests)},
            )
        )
    return found


def recommend(
    profiles: Iterable[JobProfile],
    demand: Iterable[DemandHour],
    endpoints: Iterable[EndpointHour],
    basis: Basis,
) -> list[Recommendation]:
    """Every recommendation for the window, largest monthly saving first."""
    profiles = list(profiles)
    found = each_profile((rightsize, spot), profiles, basis)
    found += oversized(profiles, basis)
    found += reserved(demand, basis)
    found += idle_endpoints(endpoints, basis)
    return sorted(found, key=lambda r: (-r.monthly_saving_usd, r.kind.value, r.subject))


@dataclass(frozen=True)
class Screening:
    """How many of a window's job profiles (job x GPU model x pricing) were judged, and how
    many were set aside for each reason: said when nothing is recommended."""

    judged: int
    set_aside: dict[str, int]

    def describe(self) -> str:
        total = self.judged + sum(self.set_aside.values())
        if total == 0:
            return "no job ran in the window"
        reasons = "; ".join(f"{n} {why}" for why, n in sorted(self.set_aside.items()))
        return f"judged {self.judged} of {total} job profiles" + (
            f"; set aside: {reasons}" if reasons else ""
        )


def screen(profiles: Iterable[JobProfile], basis: Basis) -> Screening:
    """Why a profile cannot be judged, by the first of `rightsize`'s and `spot`'s rules it
    breaks (a profile either rule can judge counts as judged)."""
    thresholds = basis.thresholds
    judged = 0
    set_aside: dict[str, int] = defaultdict(int)
    for profile in profiles:
        if profile.gpu_hours < thresholds.min_gpu_hours:
            set_aside[f"under {thresholds.min_gpu_hours:g} GPU-hour(s) in the window"] += 1
        elif profile.charged_rate <= 0:
            set_aside["unpriced (no price for its GPU model)"] += 1
        elif profile.gpu_model not in basis.specs and profile.job_type not in (
            thresholds.batch_job_types
        ):
            set_aside["GPU model without a known spec"] += 1
        elif profile.p95_util_sm is None and profile.job_type not in (thresholds.batch_job_types):
            set_aside["no utilization measured (MIG instance or no NVML counter)"] += 1
        else:
            judged += 1
    return Screening(judged, dict(set_aside))
