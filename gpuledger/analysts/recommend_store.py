"""The recommendations' store side: read a window's job profiles, GPU demand and endpoint
hours from ClickHouse, compute the recommendations, and save a run in
`gpuledger.recommendations`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from gpuledger.analysts.findings import (
    Basis,
    DemandHour,
    EndpointHour,
    JobProfile,
    Recommendation,
)
from gpuledger.analysts.recommend import Screening, recommend, screen
from gpuledger.analysts.sql import WINDOW_ARGS, ch_time, rows_as_dicts, window_params
from gpuledger.analysts.window import Window

_PROFILES_SQL = f"""
SELECT job_id, team, project, job_type, experiment_id, state, started_at, ended_at, labels,
    gpu_model, mig_profile, provider, region, pricing_model, gpus, first_ts, last_ts,
    gpu_seconds, gpu_hours, cost_usd, idle_cost_usd, peak_mem_bytes, p95_util_sm,
    max_util_sm, mean_util_sm
FROM gpuledger.job_resource_profile({WINDOW_ARGS})
ORDER BY job_id, gpu_model, mig_profile, pricing_model
"""
_DEMAND_SQL = f"""
SELECT hour, provider, region, gpu_model, mig_profile, pricing_model, gpus, cost_usd
FROM gpuledger.gpu_hourly_demand({WINDOW_ARGS})
ORDER BY hour
"""
_ENDPOINTS_SQL = f"""
SELECT job_id, hour, team, project, cost_usd, gpu_seconds, idle_cost_usd, requests, tokens
FROM gpuledger.endpoint_hourly({WINDOW_ARGS})
ORDER BY job_id, hour
"""


def fetch_profiles(client: Any, window: Window) -> list[JobProfile]:
    rows = rows_as_dicts(client.query(_PROFILES_SQL, parameters=window_params(window)))
    return [JobProfile(**{**row, "labels": dict(row["labels"] or {})}) for row in rows]


def fetch_demand(client: Any, window: Window) -> list[DemandHour]:
    rows = rows_as_dicts(client.query(_DEMAND_SQL, parameters=window_params(window)))
    return [DemandHour(**row) for row in rows]


def fetch_endpoints(client: Any, window: Window) -> list[EndpointHour]:
    rows = rows_as_dicts(client.query(_ENDPOINTS_SQL, parameters=window_params(window)))
    return [EndpointHour(**row) for row in rows]


def compute_with_screening(client: Any, basis: Basis) -> tuple[list[Recommendation], Screening]:
    """The recommendations of `basis.window`, and which jobs were judged or set aside and why."""
    window = basis.window
    profiles = fetch_profiles(client, window)
    found = recommend(
        profiles, fetch_demand(client, window), fetch_endpoints(client, window), basis
    )
    return found, screen(profiles, basis)


NOTHING = "no recommendation for this window"
SAVED_COLUMNS = [
    "generated_at",
    "window_start",
    "window_end",
    "kind",
    "subject",
    "team",
    "project",
    "current",
    "proposed",
    "window_saving_usd",
    "monthly_saving_usd",
    "risk",
    "detail",
]


def save(
    client: Any,
    recommendations: Sequence[Recommendation],
    window: Window,
    generated_at: datetime | None = None,
) -> datetime:
    """Store a run's recommendations in `gpuledger.recommendations` (read them through the
    `recommendations_latest` view); returns the run's generated_at."""
    when = generated_at or datetime.now(UTC)
    stamp = datetime.fromisoformat(ch_time(when)).replace(tzinfo=UTC)
    rows = [
        [
            stamp,
            window.start,
            window.end,
            r.kind.value,
            r.subject,
            r.team,
            r.project,
            r.current,
            r.proposed,
            r.window_saving_usd,
            r.monthly_saving_usd,
            r.risk,
            r.detail,
        ]
        for r in recommendations
    ]
    if not rows:
        # A run that found nothing must still replace the previous run in the latest view.
        rows = [
            [stamp, window.start, window.end, "none", "", "", "", "", "", 0.0, 0.0, "", NOTHING]
        ]
    client.insert("gpuledger.recommendations", rows, column_names=SAVED_COLUMNS)
    return stamp
