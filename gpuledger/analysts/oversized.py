"""Instance-type guardrails: workloads that hold more GPU than they use, flagged (never
blocked) with what the right size would have cost less.

- **Memory-light inference**: an inference job held its GPUs for at least
  `oversized_min_days` of the window and never used `oversized_memory_share` of a GPU's
  memory (peak over the window): the cheapest GPU, or MIG slice of its own, whose memory
  fits the peak with headroom (and its compute the p95 utilization, where measured).
- **Whole-node notebooks**: a notebook holding `whole_node_gpus` GPUs or more: one GPU
  would have done for interactive work; the saving is all but one GPU's cost.

Savings are the window's, scaled to 30 days like every recommendation's.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from gpuledger.analysts.findings import (
    Basis,
    JobProfile,
    Kind,
    Recommendation,
    advice,
    each_profile,
)
from gpuledger.analysts.prices import GB
from gpuledger.analysts.window import as_utc
from gpuledger.output import money

RISK = (
    "flag only: nothing is changed; the figure is what the right size would have cost less "
    "had the window's pattern held"
)


# A flag changes nothing, so every flag carries the same risk.
_flag = partial(advice, Kind.oversized, risk=RISK)


def held_days(profile: JobProfile) -> float:
    """How long the job held its GPUs in the window, from its first to its last fact."""
    return (as_utc(profile.last_ts) - as_utc(profile.first_ts)).total_seconds() / 86400


def memory_light(profile: JobProfile, basis: Basis) -> Recommendation | None:
    thresholds = basis.thresholds
    spec = basis.specs.get(profile.gpu_model)
    if (
        spec is None
        or profile.job_type != "inference"
        or profile.mig_profile
        or profile.charged_rate <= 0
        or held_days(profile) < thresholds.oversized_min_days
    ):
        return None
    share = profile.peak_mem_bytes / spec.memory_bytes
    if share >= thresholds.oversized_memory_share:
        return None
    need_bytes = profile.peak_mem_bytes * thresholds.memory_headroom
    need_tflops = (profile.p95_util_sm or 0.0) * spec.tflops * thresholds.compute_headroom
    fits = basis.fitting(profile, spec, tflops=need_tflops, memory_bytes=need_bytes)
    current = profile.charged_rate
    best = min(fits, key=lambda c: (c.usd_per_gpu_hour, c.label), default=None)
    if best is None or best.usd_per_gpu_hour >= current:
        return None
    saving = (current - best.usd_per_gpu_hour) * profile.gpu_hours
    return _flag(
        profile,
        basis.window,
        saving,
        current=(
            f"inference on {profile.gpus} x {profile.gpu_model} for {held_days(profile):.1f} "
            f"days, peak memory {profile.peak_mem_bytes / GB:.1f} GB ({share:.0%} of "
            f"{spec.memory_gb:g} GB)"
        ),
        proposed=f"{profile.gpus} x {best.label} ({best.memory_bytes / GB:.0f} GB)",
        detail=(
            f"under {thresholds.oversized_memory_share:.0%} of the GPU's memory for at least "
            f"{thresholds.oversized_min_days:g} days; {best.label} at "
            f"{money(best.usd_per_gpu_hour)}/GPU-h ({best.price_from}) instead of "
            f"{money(current)}/GPU-h"
        ),
        numbers={
            "memory_share": share,
            "current_rate": current,
            "proposed_rate": best.usd_per_gpu_hour,
        },
    )


def whole_node(profile: JobProfile, basis: Basis) -> Recommendation | None:
    thresholds = basis.thresholds
    if (
        profile.job_type != "notebook"
        or profile.gpus < thresholds.whole_node_gpus
        or profile.cost_usd <= 0
    ):
        return None
    saving = profile.cost_usd * (1 - 1 / profile.gpus)
    return _flag(
        profile,
        basis.window,
        saving,
        current=(
            f"notebook holding {profile.gpus} x {profile.gpu_model} ({money(profile.cost_usd)} "
            "in the window)"
        ),
        proposed=f"1 x {profile.gpu_model}; larger runs as batch jobs",
        detail=f"a notebook with {thresholds.whole_node_gpus} or more GPUs holds a whole node",
        numbers={"gpus": float(profile.gpus)},
    )


def oversized(profiles: Iterable[JobProfile], basis: Basis) -> list[Recommendation]:
    """Every flag of the window's job profiles."""
    return each_profile((memory_light, whole_node), profiles, basis)
