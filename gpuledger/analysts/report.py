"""`gpuledger report`: one self-contained HTML file for a period, readable offline.

`collect(client, window)` reads the figures (parameterized SQL over the rollups and views);
`report_html.render(data)` turns them into HTML.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from gpuledger.analysts.findings import Basis, Recommendation
from gpuledger.analysts.recommend import Screening
from gpuledger.analysts.recommend_store import compute_with_screening
from gpuledger.analysts.sql import WINDOW_ARGS, rows_as_dicts, window_params
from gpuledger.analysts.window import Window, as_utc

UNALLOCATED = "(unallocated)"
OTHER = "(other teams)"
MAX_TEAMS = 8
HALF = 470  # viewBox width of a chart in a half-width column: its text stays legible
_START = "{start:DateTime64(3, 'UTC')}"
_END = "{end:DateTime64(3, 'UTC')}"


@dataclass(frozen=True)
class Totals:
    gpu_hours: float = 0.0
    cost_usd: float = 0.0
    allocated_cost_usd: float = 0.0
    unallocated_cost_usd: float = 0.0
    idle_cost_usd: float = 0.0  # on allocated GPUs
    price_missing_gpu_hours: float = 0.0
    mean_util_sm: float | None = None


@dataclass(frozen=True)
class ProjectSpend:
    project: str
    cost_usd: float
    idle_cost_usd: float
    gpu_hours: float


@dataclass(frozen=True)
class TeamIdle:
    team: str
    idle_cost_usd: float
    idle_gpu_hours: float
    cost_usd: float


@dataclass(frozen=True)
class ProjectEffectiveCost:
    project: str
    total_spend_usd: float
    jobs_finished: int
    jobs_succeeded: int
    job_success_rate: float | None
    resource_utilization: float | None
    effective_cost_usd: float | None


@dataclass(frozen=True)
class TrainingRun:
    job_id: str
    team: str
    project: str
    state: str
    gpu_hours: float
    cost_usd: float
    idle_cost_usd: float
    mean_util_sm: float | None


@dataclass(frozen=True)
class TrainingProject:
    project: str
    runs: int
    succeeded: int
    avg_cost_usd: float
    cost_per_successful_run_usd: float | None


@dataclass(frozen=True)
class EndpointCost:
    job_id: str
    team: str
    project: str
    cost_usd: float
    requests: int
    usd_per_1k_requests: float | None


@dataclass(frozen=True)
class FunnelStage:
    """A team's GPU-hours and dollars on one GPU model at each stage of the fleet funnel
    (team '': unallocated)."""

    team: str
    gpu_model: str
    total_gpu_hours: float
    total_usd: float
    allocated_usd: float
    active_usd: float
    effective_usd: float


@dataclass(frozen=True)
class GuardSavings:
    month: str
    team: str
    actions: int
    saved_usd: float
    dry_runs: int
    would_save_usd: float


@dataclass
class ReportData:
    window: Window
    generated_at: datetime
    price_source: str
    totals: Totals
    buckets: list[str] = field(default_factory=list)
    bucket_unit: str = "day"
    team_series: dict[str, list[float]] = field(default_factory=dict)
    projects: list[ProjectSpend] = field(default_factory=list)
    idle_by_team: list[TeamIdle] = field(default_factory=list)
    effective: list[ProjectEffectiveCost] = field(default_factory=list)
    weeks: list[str] = field(default_factory=list)
    weekly_effective: dict[str, list[float | None]] = field(default_factory=dict)
    training_runs: list[TrainingRun] = field(default_factory=list)
    training_projects: list[TrainingProject] = field(default_factory=list)
    endpoints: list[EndpointCost] = field(default_factory=list)
    endpoint_days: list[str] = field(default_factory=list)
    endpoint_daily: dict[str, list[float | None]] = field(default_factory=dict)
    recommendations: list[Recommendation] = field(default_factory=list)
    screening: Screening | None = None
    guard_savings: list[GuardSavings] = field(default_factory=list)
    funnel: list[FunnelStage] = field(default_factory=list)
    """Which jobs the recommendations judged or set aside, and why."""
    coverage_note: str | None = None
    """Said at the top when the window holds no facts: what the store does hold."""


# -- collecting ------------------------------------------------------------------------------

_WINDOW = f"m.ts >= {_START} AND m.ts < {_END}"

TOTALS_SQL = f"""
SELECT
    sum(m.gpu_seconds) / 3600 AS gpu_hours,
    sum(m.cost_usd) AS cost_usd,
    sumIf(m.cost_usd, m.allocated = 1) AS allocated_cost_usd,
    sumIf(m.cost_usd, m.allocated = 0) AS unallocated_cost_usd,
    sumIf(m.idle_cost_usd, m.allocated = 1) AS idle_cost_usd,
    sum(m.price_missing_gpu_seconds) / 3600 AS price_missing_gpu_hours,
    if(sum(m.util_rows) > 0 AND sum(m.util_gpu_seconds) > 0,
        sum(m.util_sm_seconds) / sum(m.util_gpu_seconds), NULL) AS mean_util_sm
FROM gpuledger.cost_minute AS m
WHERE {_WINDOW}
"""

SPEND_BY_TEAM_SQL = f"""
SELECT
    toStartOfInterval(m.ts, toIntervalSecond({{bucket_s:UInt32}})) AS bucket,
    m.team AS team,
    sum(m.cost_usd) AS cost_usd
FROM gpuledger.cost_minute AS m
WHERE {_WINDOW}
GROUP BY bucket, team
HAVING sum(m.rows) != 0
ORDER BY bucket, team
"""

# What the spend and idle tables sum over the window's allocated minutes, by column.
_ALLOCATED_SUMS = {
    "cost_usd": "sum(m.cost_usd)",
    "idle_cost_usd": "sum(m.idle_cost_usd)",
    "gpu_hours": "sum(m.gpu_seconds) / 3600",
    "idle_gpu_hours": "sum(m.idle_gpu_seconds) / 3600",
}


def _allocated_by(key: str, columns: Sequence[str], order_by: str) -> str:
    """Per `key` (team or project), the `columns` of `_ALLOCATED_SUMS`, largest `order_by`
    first."""
    sums = ",\n".join(f"    {_ALLOCATED_SUMS[c]} AS {c}" for c in columns)
    return f"""
SELECT
    m.{key} AS {key},
{sums}
FROM gpuledger.cost_minute AS m
WHERE m.allocated = 1 AND {_WINDOW}
GROUP BY {key}
HAVING sum(m.rows) != 0
ORDER BY {order_by} DESC, {key}
"""


PROJECTS_SQL = _allocated_by("project", ["cost_usd", "idle_cost_usd", "gpu_hours"], "cost_usd")
IDLE_BY_TEAM_SQL = _allocated_by(
    "team", ["idle_cost_usd", "idle_gpu_hours", "cost_usd"], "idle_cost_usd"
)

# EffectiveCost over the window: spend in it, jobs that ended in it (the view's definition).
EFFECTIVE_COST_SQL = f"""
SELECT project, total_spend_usd, jobs_finished, jobs_succeeded, job_success_rate,
    resource_utilization, effective_cost_usd
FROM gpuledger.project_effective_cost_between(start = {_START}, end = {_END})
WHERE project != ''
ORDER BY total_spend_usd DESC, project
"""

WEEKLY_EFFECTIVE_SQL = f"""
SELECT w.week AS week, w.project AS project, w.effective_cost_usd AS effective_cost_usd
FROM gpuledger.project_effective_cost_weekly AS w
WHERE w.week >= toMonday({_START}) AND w.week < {_END} AND w.project != ''
ORDER BY week, project
"""

TRAINING_RUNS_SQL = f"""
SELECT job_id, team, project, state, gpu_hours, cost_usd, idle_cost_usd, mean_util_sm
FROM gpuledger.job_costs
WHERE job_type = 'training' AND last_ts >= {_START} AND last_ts < {_END}
ORDER BY cost_usd DESC, job_id
LIMIT 15
"""

TRAINING_PROJECTS_SQL = f"""
SELECT
    project,
    count() AS runs,
    countIf(state = 'succeeded') AS succeeded,
    avg(cost_usd) AS avg_cost_usd,
    if(succeeded > 0, sum(cost_usd) / succeeded, NULL) AS cost_per_successful_run_usd
FROM gpuledger.job_costs
WHERE job_type = 'training' AND last_ts >= {_START} AND last_ts < {_END}
GROUP BY project
ORDER BY avg_cost_usd DESC, project
"""

ENDPOINTS_SQL = f"""
SELECT
    e.job_id AS job_id,
    argMax(e.team, e.hour) AS team,
    argMax(e.project, e.hour) AS project,
    sum(e.cost_usd) AS cost_usd,
    sum(e.requests) AS requests,
    if(sum(e.requests) > 0, 1000 * sum(e.cost_usd) / sum(e.requests), NULL)
        AS usd_per_1k_requests
FROM gpuledger.endpoint_hourly({WINDOW_ARGS}) AS e
GROUP BY job_id
ORDER BY cost_usd DESC, job_id
"""

ENDPOINTS_DAILY_SQL = f"""
SELECT
    toDate(e.hour) AS day,
    e.job_id AS job_id,
    if(sum(e.requests) > 0, 1000 * sum(e.cost_usd) / sum(e.requests), NULL)
        AS usd_per_1k_requests
FROM gpuledger.endpoint_hourly({WINDOW_ARGS}) AS e
GROUP BY day, job_id
ORDER BY day, job_id
"""

FUNNEL_SQL = f"""
SELECT team, gpu_model, total_gpu_hours, total_usd, allocated_usd, active_usd, effective_usd
FROM gpuledger.fleet_funnel({WINDOW_ARGS})
ORDER BY total_usd DESC, team, gpu_model
"""

GUARD_SAVINGS_SQL = f"""
SELECT
    formatDateTime(g.month, '%Y-%m') AS month,
    g.team AS team,
    toInt64(sum(g.actions)) AS actions,
    sum(g.saved_usd) AS saved_usd,
    toInt64(sum(g.dry_runs)) AS dry_runs,
    sum(g.would_save_usd) AS would_save_usd
FROM gpuledger.guard_savings_between({WINDOW_ARGS}) AS g
GROUP BY month, team
ORDER BY month, saved_usd + would_save_usd DESC, team
"""


def _query(client: Any, sql: str, window: Window, **extra: Any) -> list[dict[str, Any]]:
    return rows_as_dicts(client.query(sql, parameters={**window_params(window), **extra}))


@dataclass(frozen=True)
class Buckets:
    """How the spend chart cuts the window: days, hours or five minutes (aligned to UTC)."""

    seconds: int
    unit: str
    label: str  # strftime format of a bucket's start


def buckets_for(window: Window) -> Buckets:
    if window.hours > 48:
        return Buckets(86400, "day", "%b %d")
    if window.hours > 4:
        return Buckets(3600, "hour", "%d %H:00")
    return Buckets(300, "5 minutes", "%H:%M")


def bucket_starts(window: Window, size: Buckets) -> list[datetime]:
    """The bucket start times that cover the window."""
    first = int(window.start.timestamp()) // size.seconds * size.seconds
    start = datetime.fromtimestamp(first, UTC)
    found = []
    while start < window.end:
        found.append(start)
        start += timedelta(seconds=size.seconds)
    return found


def team_name(team: str) -> str:
    return team or UNALLOCATED


def fold_teams(
    rows: Sequence[dict[str, Any]], starts: Sequence[datetime]
) -> dict[str, list[float]]:
    """Spend per team and bucket; teams past the top MAX_TEAMS become one series."""
    slot = {start: i for i, start in enumerate(starts)}
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        totals[team_name(row["team"])] += row["cost_usd"]
    ranked = sorted(totals, key=lambda t: (-totals[t], t))
    kept = set(ranked[:MAX_TEAMS]) if len(ranked) > MAX_TEAMS + 1 else set(ranked)
    series: dict[str, list[float]] = {t: [0.0] * len(starts) for t in ranked if t in kept}
    for row in rows:
        name = team_name(row["team"])
        key = name if name in kept else OTHER
        i = slot.get(as_utc(row["bucket"]))
        if i is None:
            continue
        series.setdefault(key, [0.0] * len(starts))[i] += row["cost_usd"]
    return series


def collect(
    client: Any, basis: Basis, *, price_source: str, generated_at: datetime | None = None
) -> ReportData:
    """Read every figure of the report for `basis.window`."""
    window = basis.window
    found, screening = compute_with_screening(client, basis)
    totals = Totals()
    for row in _query(client, TOTALS_SQL, window):
        # Sums over no rows are NULL: zero dollars, but an unknown mean utilization.
        totals = Totals(
            **{k: 0.0 if v is None and k != "mean_util_sm" else v for k, v in row.items()}
        )
    size = buckets_for(window)
    starts = bucket_starts(window, size)
    team_rows = _query(client, SPEND_BY_TEAM_SQL, window, bucket_s=size.seconds)

    weekly_rows = _query(client, WEEKLY_EFFECTIVE_SQL, window)
    weeks = sorted({row["week"] for row in weekly_rows})
    weekly: dict[str, list[float | None]] = defaultdict(lambda: [None] * len(weeks))
    for row in weekly_rows:
        weekly[row["project"]][weeks.index(row["week"])] = row["effective_cost_usd"]

    daily_rows = _query(client, ENDPOINTS_DAILY_SQL, window)
    days = sorted({row["day"] for row in daily_rows})
    per_day: dict[str, list[float | None]] = defaultdict(lambda: [None] * len(days))
    for row in daily_rows:
        per_day[row["job_id"]][days.index(row["day"])] = row["usd_per_1k_requests"]

    return ReportData(
        window=window,
        generated_at=generated_at or datetime.now(UTC),
        price_source=price_source,
        totals=totals,
        buckets=[s.strftime(size.label) for s in starts],
        bucket_unit=size.unit,
        team_series=fold_teams(team_rows, starts),
        projects=[ProjectSpend(**r) for r in _query(client, PROJECTS_SQL, window)],
        idle_by_team=[TeamIdle(**r) for r in _query(client, IDLE_BY_TEAM_SQL, window)],
        effective=[ProjectEffectiveCost(**r) for r in _query(client, EFFECTIVE_COST_SQL, window)],
        weeks=[w.strftime("week of %b %d") for w in weeks],
        weekly_effective=dict(weekly),
        training_runs=[TrainingRun(**r) for r in _query(client, TRAINING_RUNS_SQL, window)],
        training_projects=[
            TrainingProject(**r) for r in _query(client, TRAINING_PROJECTS_SQL, window)
        ],
        endpoints=[EndpointCost(**r) for r in _query(client, ENDPOINTS_SQL, window)],
        endpoint_days=[d.strftime("%b %d") for d in days],
        endpoint_daily=dict(per_day),
        recommendations=found,
        screening=screening,
        guard_savings=[GuardSavings(**r) for r in _query(client, GUARD_SAVINGS_SQL, window)],
        funnel=[FunnelStage(**r) for r in _query(client, FUNNEL_SQL, window)],
    )
