"""*Cost explorer*: the analysts' board. Cost by team, project, job type and experiment;
cost per training run; cost per 1,000 inferences; EffectiveCost per project; idle waste;
the spot / on-demand / reserved mix; cost per model and environment. Variables: team, project,
model, environment.

Totals read the hour rollup (`cost_hour`), so a range counts whole hours: an hour bucket is in
the range when it starts inside it. Per-run costs come from `job_costs` and are the whole
run's cost (a run that overlaps the range is shown with all of its cost).
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, piechart, stat
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import piechart as piechart_models

from gpuledger.grafana.board import Board, all_of, tagged
from gpuledger.grafana.clickhouse import DATASOURCE_UID, QueryFormat
from gpuledger.grafana.panels import legend, stacked_usd_by_team, unit, usd_table

UID = "gpuledger-cost-explorer"
TITLE = "GPU cost explorer"

FILTERS = ("team", "project")
TAGS = ("model", "environment")
HOURS = "$__timeFilter(h.ts)"
BUCKET = "greatest($__interval_s, 3600)"
MEAN_UTIL = (
    "if(sum(h.util_rows) > 0 AND sum(h.util_gpu_seconds) > 0, "
    "sum(h.util_sm_seconds) / sum(h.util_gpu_seconds), NULL)"
)


def build_board(datasource_uid: str = DATASOURCE_UID) -> Board:
    board = Board(
        UID,
        TITLE,
        description="Where GPU money goes: teams, projects, job types, experiments, training "
        "runs, inference unit cost, EffectiveCost, idle waste, pricing mix (gpuledger).",
        time_from="now-30d",
        refresh=None,
        datasource_uid=datasource_uid,
    )
    for name, label in (("team", "Team"), ("project", "Project")):
        board.variable(
            name,
            label,
            f"SELECT DISTINCT h.{name} FROM gpuledger.cost_hour AS h "
            f"WHERE $__timeFilter(h.ts) AND h.{name} != '' ORDER BY h.{name}",
        )
    for name, label in (("model", "Model"), ("environment", "Environment")):
        board.variable(
            name,
            label,
            f"SELECT DISTINCT c.{name} FROM gpuledger.cost_job_gpu_hour AS c "
            f"WHERE $__timeFilter(c.hour) AND c.{name} != '' ORDER BY c.{name}",
        )
    where = f"{all_of('h', *FILTERS)} AND {tagged('h', *TAGS)}"

    board.panel(
        stat.Panel()
        .unit("currencyUSD")
        .decimals(2)
        .graph_mode(common_models.BigValueGraphMode.NONE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .override_by_name("unpriced_gpu_hours", [unit("h")]),
        title="Total cost",
        description="Cost, the part of it held by jobs, the idle part, and GPU-hours that found "
        "no price (costed at 0 until a price covers them).",
        sql=f"""SELECT
    sum(h.cost_usd) AS cost_usd,
    sumIf(h.cost_usd, h.allocated = 1) AS allocated_cost_usd,
    sum(h.idle_cost_usd) AS idle_cost_usd,
    sum(h.price_missing_gpu_seconds) / 3600 AS unpriced_gpu_hours
FROM gpuledger.cost_hour AS h
WHERE {HOURS} AND {where}""",
        width=24,
        height=4,
    )
    team_bars(
        board,
        "Cost by team over time",
        "Cost per bucket (at least an hour); '(unallocated)' is GPU time no job held.",
        team="if(h.team = '', '(unallocated)', h.team)",
        value="cost_usd",
        where=where,
        width=16,
    )
    board.panel(
        usd_table("cost_usd", "idle_cost_usd", "allocated_cost_usd", percent=("mean_util_sm",)),
        title="Cost by team",
        description="Per team over the range; team '' is unallocated GPU time.",
        sql=f"""SELECT
    h.team AS team_name,
    sum(h.gpu_seconds) / 3600 AS gpu_hours,
    sum(h.cost_usd) AS cost_usd,
    sumIf(h.cost_usd, h.allocated = 1) AS allocated_cost_usd,
    sum(h.idle_cost_usd) AS idle_cost_usd,
    {MEAN_UTIL} AS mean_util_sm
FROM gpuledger.cost_hour AS h
WHERE {HOURS} AND {where}
GROUP BY team_name
HAVING sum(h.rows) != 0
ORDER BY cost_usd DESC""",
        width=8,
        height=8,
    )
    board.panel(
        barchart.Panel()
        .unit("currencyUSD")
        .x_field("project_name")
        .orientation(common_models.VizOrientation.HORIZONTAL)
        .legend(legend()),
        title="Cost by project",
        description="The 30 most expensive projects over the range, with their idle part.",
        sql=f"""SELECT
    if(h.project = '', '(none)', h.project) AS project_name,
    sum(h.cost_usd) AS cost_usd,
    sum(h.idle_cost_usd) AS idle_cost_usd
FROM gpuledger.cost_hour AS h
WHERE {HOURS} AND {where}
GROUP BY project_name
HAVING sum(h.rows) != 0
ORDER BY cost_usd DESC
LIMIT 30""",
        width=12,
        height=9,
    )
    cost_pie(
        board,
        "Cost by job type",
        "training, inference, tuning, data_processing, notebook, other; '(unallocated)' is GPU "
        "time no job held.",
        "if(h.job_type = '', '(unallocated)', h.job_type) AS job_type_name",
        where,
        donut=True,
    )
    cost_pie(
        board,
        "Pricing mix",
        "Cost by pricing model of the nodes: on_demand, spot, reserved.",
        "h.pricing_model AS pricing",
        where,
    )
    board.panel(
        usd_table("cost_usd", "idle_cost_usd", percent=("mean_util_sm",)),
        title="Cost by experiment",
        description="Experiments (experiment_id) over the range: jobs, GPU-hours, cost.",
        sql=f"""SELECT
    h.experiment_id AS experiment,
    h.project AS project_name,
    uniqExact(h.job_id) AS jobs,
    sum(h.gpu_seconds) / 3600 AS gpu_hours,
    sum(h.cost_usd) AS cost_usd,
    sum(h.idle_cost_usd) AS idle_cost_usd,
    {MEAN_UTIL} AS mean_util_sm
FROM gpuledger.cost_hour AS h
WHERE {HOURS} AND h.experiment_id != '' AND {where}
GROUP BY experiment, project_name
HAVING sum(h.rows) != 0
ORDER BY cost_usd DESC
LIMIT 500""",
        width=12,
        height=8,
    )
    board.panel(
        usd_table("cost_usd", "idle_cost_usd", percent=("mean_util_sm",)),
        title="Cost per training run",
        description="Training jobs that ran during the range, each with its whole cost "
        "(gpuledger.job_costs).",
        sql=f"""SELECT
    j.job_id AS job_id,
    j.team AS team_name,
    j.project AS project_name,
    j.experiment_id AS experiment,
    j.state AS state,
    j.first_ts AS first_sample,
    j.last_ts AS last_sample,
    j.gpus AS gpus,
    j.gpu_hours AS gpu_hours,
    j.cost_usd AS cost_usd,
    j.idle_cost_usd AS idle_cost_usd,
    j.mean_util_sm AS mean_util_sm
FROM gpuledger.job_costs AS j
WHERE j.job_type = 'training' AND j.last_ts >= $__fromTime AND j.first_ts <= $__toTime
    AND {all_of("j", *FILTERS, *TAGS)}
ORDER BY cost_usd DESC
LIMIT 500""",
        width=12,
        height=8,
    )
    board.panel(
        usd_table("cost_usd", "usd_per_1k_requests", "usd_per_1m_tokens"),
        title="Cost per 1,000 inferences",
        description="Inference jobs over the days of the range: cost, requests and tokens "
        "(UsageEvent), 1000 x cost / requests (gpuledger.inference_unit_cost).",
        sql=f"""SELECT
    u.job_id AS job_id,
    any(u.team) AS team_name,
    any(u.project) AS project_name,
    sum(u.cost_usd) AS cost_usd,
    sum(u.requests) AS requests,
    sum(u.tokens) AS tokens,
    if(sum(u.requests) > 0, 1000 * sum(u.cost_usd) / sum(u.requests), NULL)
        AS usd_per_1k_requests,
    if(sum(u.tokens) > 0, 1000000 * sum(u.cost_usd) / sum(u.tokens), NULL) AS usd_per_1m_tokens
FROM gpuledger.inference_unit_cost AS u
WHERE $__dateFilter(u.day) AND {all_of("u", *FILTERS)} AND {tagged("u", *TAGS)}
GROUP BY job_id
ORDER BY cost_usd DESC
LIMIT 500""",
        width=12,
        height=8,
    )
    board.panel(
        usd_table(
            "total_spend_usd",
            "effective_cost_usd",
            percent=("job_success_rate", "resource_utilization"),
        ),
        title="EffectiveCost per project",
        description="Over the range: TotalSpend / (JobSuccessRate x "
        "ResourceUtilization); spend in the range, jobs that ended in it. Empty (not 0) when "
        "no job succeeded or nothing was used. Per project with all its teams' jobs (the team "
        "variable does not narrow a project's ratio); over all time this equals "
        "gpuledger.project_effective_cost.",
        sql=f"""SELECT
    e.project AS project,
    e.total_spend_usd AS total_spend_usd,
    e.jobs_finished AS jobs_finished,
    e.jobs_succeeded AS jobs_succeeded,
    e.job_success_rate AS job_success_rate,
    e.resource_utilization AS resource_utilization,
    e.effective_cost_usd AS effective_cost_usd,
    e.unpriced_gpu_hours AS unpriced_gpu_hours
FROM gpuledger.project_effective_cost_between(start = $__fromTime, end = $__toTime) AS e
WHERE {all_of("e", "project")}
ORDER BY total_spend_usd DESC""",
        width=24,
        height=8,
    )
    team_bars(
        board,
        "Idle waste over time",
        "Dollars paid for capacity that allocated GPUs did not use, per team.",
        team="h.team",
        value="idle_cost_usd",
        where=f"h.allocated = 1 AND {where}",
        width=12,
    )
    board.panel(
        usd_table("cost_usd", "idle_cost_usd", percent=("idle_share", "wasted_share")),
        title="Idle waste by team and project",
        description="Allocated GPU time under the idle threshold and the cost of unused "
        "capacity, per team and project.",
        sql=f"""SELECT
    h.team AS team_name,
    h.project AS project_name,
    sum(h.gpu_seconds) / 3600 AS gpu_hours,
    sum(h.idle_gpu_seconds) / 3600 AS idle_gpu_hours,
    sum(h.cost_usd) AS cost_usd,
    sum(h.idle_cost_usd) AS idle_cost_usd,
    if(sum(h.gpu_seconds) > 1e-9, sum(h.idle_gpu_seconds) / sum(h.gpu_seconds), NULL)
        AS idle_share,
    if(sum(h.cost_usd) > 1e-12, sum(h.idle_cost_usd) / sum(h.cost_usd), NULL) AS wasted_share
FROM gpuledger.cost_hour AS h
WHERE {HOURS} AND h.allocated = 1 AND {where}
GROUP BY team_name, project_name
HAVING sum(h.rows) != 0
ORDER BY idle_cost_usd DESC
LIMIT 500""",
        width=12,
        height=8,
    )
    board.panel(
        usd_table("total_usd", "allocated_usd", "active_usd", "effective_usd"),
        title="Fleet funnel",
        description="Over the range, per team and GPU model: what the GPUs cost (total), the "
        "part jobs held (allocated), the part of that the GPUs were busy (active: not idle) "
        "and that weighted by SM utilization (effective). Each stage is inside the one "
        "before; an empty team is GPU time no job held.",
        sql=f"""SELECT
    f.team AS team_name,
    f.gpu_model AS gpu_model,
    f.total_gpu_hours AS total_gpu_hours,
    f.total_usd AS total_usd,
    f.allocated_usd AS allocated_usd,
    f.active_usd AS active_usd,
    f.effective_usd AS effective_usd
FROM gpuledger.fleet_funnel(start = $__fromTime, end = $__toTime) AS f
WHERE {all_of("f", "team")}
ORDER BY total_usd DESC
LIMIT 500""",
        width=24,
        height=8,
    )
    board.panel(
        usd_table("cost_usd", "idle_cost_usd", percent=("mean_util_sm", "mean_sm_active")),
        title="Cost per model and environment",
        description="Allocated GPU time over the range per model and environment tag (job "
        "events, GPULEDGER_MODEL / GPULEDGER_ENVIRONMENT, pod labels gpuledger.io/model and "
        "gpuledger.io/environment); '(none)' is untagged. Busy time and SM activity (GPUs "
        "with GPM) weighted by GPU time.",
        sql=f"""SELECT
    if(c.model = '', '(none)', c.model) AS model_name,
    if(c.environment = '', '(none)', c.environment) AS environment_name,
    uniqExact(c.job_id) AS jobs,
    sum(c.gpu_seconds) / 3600 AS gpu_hours,
    sum(c.cost_usd) AS cost_usd,
    sum(c.idle_cost_usd) AS idle_cost_usd,
    if(sum(c.util_gpu_seconds) > 1e-9, sum(c.util_sm_seconds) / sum(c.util_gpu_seconds), NULL)
        AS mean_util_sm,
    if(sum(c.sm_gpu_seconds) > 1e-9, sum(c.sm_active_seconds) / sum(c.sm_gpu_seconds), NULL)
        AS mean_sm_active
FROM gpuledger.focus_hourly_charges(start = $__fromTime, end = $__toTime) AS c
WHERE c.job_id != '' AND {all_of("c", *FILTERS, *TAGS)}
GROUP BY model_name, environment_name
ORDER BY cost_usd DESC
LIMIT 500""",
        width=24,
        height=8,
    )
    return board


def team_bars(
    board: Board, title: str, description: str, *, team: str, value: str, where: str, width: int
) -> None:
    """Stacked bars per team (`team`, an expression) of one `cost_hour` sum over time, in
    buckets of at least an hour."""
    board.panel(
        stacked_usd_by_team(fill_opacity=80, bars=True),
        title=title,
        description=description,
        sql=f"""SELECT
    toStartOfInterval(h.ts, INTERVAL {BUCKET} SECOND) AS time,
    {team} AS team_name,
    sum(h.{value}) AS {value}
FROM gpuledger.cost_hour AS h
WHERE {HOURS} AND {where}
GROUP BY time, team_name
HAVING sum(h.rows) != 0
ORDER BY time, team_name""",
        fmt=QueryFormat.TIME_SERIES,
        width=width,
        height=8,
    )


def cost_pie(
    board: Board, title: str, description: str, label: str, where: str, donut: bool = False
) -> None:
    """A pie of the range's cost split by `label` (`expression AS name`)."""
    name = label.rsplit(" AS ", 1)[1]
    shape = piechart_models.PieChartType.DONUT if donut else piechart_models.PieChartType.PIE
    board.panel(
        piechart.Panel()
        .unit("currencyUSD")
        .pie_type(shape)
        .reduce_options(common_builders.ReduceDataOptions().values(True).calcs(["sum"]))
        .legend(piechart.PieChartLegendOptions().show_legend(True)),
        title=title,
        description=description,
        sql=f"""SELECT
    {label},
    sum(h.cost_usd) AS cost_usd
FROM gpuledger.cost_hour AS h
WHERE {HOURS} AND {where}
GROUP BY {name}
HAVING sum(h.rows) != 0
ORDER BY cost_usd DESC""",
        width=6,
        height=9,
    )
