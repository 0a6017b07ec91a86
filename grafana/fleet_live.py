"""*GPU fleet live*: the SRE's board. Utilization per GPU, allocated vs idle now, dollars per
hour burning, the idle allocated GPUs with their wasted dollars, firing alerts, per node.

"Now" is the last minute of the selected range (`$__toTime`), so the board also answers
"what did it look like at 03:00" when the range ends there. Every measure sums `value *
sign` (cancel and restate rows net out, ARCHITECTURE.md §3). Variables: node, team, project.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import stat, timeseries
from grafana_foundation_sdk.models import common as common_models

from gpuledger.grafana.board import Board, all_of
from gpuledger.grafana.clickhouse import DATASOURCE_UID, QueryFormat
from gpuledger.grafana.panels import legend, stacked_usd_by_team, table_panel, unit, usd_table

UID = "gpuledger-fleet-live"
TITLE = "GPU fleet live"

FILTERS = ("node", "team", "project")
# The last minute of the range: what "now" means on this board.
LAST_MINUTE = "f.ts > $__toTime - INTERVAL 60 SECOND AND f.ts <= $__toTime"


def _stat() -> stat.Panel:
    return (
        stat.Panel()
        .graph_mode(common_models.BigValueGraphMode.NONE)
        .color_mode(common_models.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def build_board(datasource_uid: str = DATASOURCE_UID) -> Board:
    board = Board(
        UID,
        TITLE,
        description="Live GPU fleet: utilization, allocation, burn rate, idle allocated GPUs, "
        "alerts (gpuledger).",
        time_from="now-1h",
        refresh="10s",
        datasource_uid=datasource_uid,
    )
    for name, label in (("node", "Node"), ("team", "Team"), ("project", "Project")):
        board.variable(
            name,
            label,
            f"SELECT DISTINCT m.{name} FROM gpuledger.cost_minute AS m "
            f"WHERE $__timeFilter(m.ts) AND m.{name} != '' ORDER BY m.{name}",
        )
    where = all_of("f", *FILTERS)

    board.panel(
        _stat().unit("none").decimals(1),
        title="GPUs now: allocated vs idle",
        description="GPUs that reported in the last minute of the range, how many are allocated "
        "to a job (fractions where jobs share a GPU), how many of those are idle, and how many "
        "are unallocated.",
        sql=f"""SELECT
    count() AS gpus,
    sum(g.allocated_share) AS allocated,
    sum(g.idle_share) AS idle_allocated,
    count() - sum(g.allocated_share) AS unallocated
FROM
(
    SELECT
        s.gpu_uuid AS gpu_uuid,
        argMax(s.allocated_share, s.ts) AS allocated_share,
        argMax(s.idle_share, s.ts) AS idle_share
    FROM
    (
        SELECT
            f.gpu_uuid AS gpu_uuid,
            f.ts AS ts,
            sum(f.share * f.allocated * f.sign) AS allocated_share,
            sum(f.share * f.idle * f.sign) AS idle_share
        FROM gpuledger.cost_facts AS f
        WHERE {LAST_MINUTE} AND {where}
        GROUP BY gpu_uuid, ts
        HAVING sum(f.sign) != 0
    ) AS s
    GROUP BY gpu_uuid
) AS g""",
        width=12,
        height=5,
    )
    board.panel(
        _stat().unit("currencyUSD").decimals(2),
        title="Burning now (USD per hour)",
        description="Cost of the last minute of the range, times 60; idle_usd_per_hour is the "
        "part paid for capacity the GPUs did not use.",
        sql=f"""SELECT
    sum(f.cost_usd * f.sign) * 60 AS usd_per_hour,
    sum(f.idle_cost_usd * f.sign) * 60 AS idle_usd_per_hour
FROM gpuledger.cost_facts AS f
WHERE {LAST_MINUTE} AND {where}""",
        width=6,
        height=5,
    )
    board.panel(
        _stat().unit("currencyUSD").decimals(2),
        title="Spent in range",
        description="Cost and idle cost over the selected range (minute rollup).",
        sql=f"""SELECT
    sum(m.cost_usd) AS cost_usd,
    sum(m.idle_cost_usd) AS idle_cost_usd
FROM gpuledger.cost_minute AS m
WHERE $__timeFilter(m.ts) AND {all_of("m", *FILTERS)}""",
        width=6,
        height=5,
    )
    board.panel(
        timeseries.Panel()
        .unit("percentunit")
        .min(0)
        .max(1)
        .legend(legend())
        .display_name("${__field.labels.gpu}"),
        title="GPU utilization",
        description="Time-weighted SM utilization per GPU (MIG instances without NVML "
        "utilization are left out).",
        sql=f"""SELECT
    $__timeInterval(f.ts) AS time,
    concat(f.node, ' ', f.gpu_uuid) AS gpu,
    sumIf(toFloat64(assumeNotNull(f.util_sm)) * f.duration_s * f.share * f.sign,
        f.util_sm IS NOT NULL)
        / sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.util_sm IS NOT NULL) AS util_sm
FROM gpuledger.cost_facts AS f
WHERE $__timeFilter(f.ts) AND {where}
GROUP BY time, gpu
HAVING sumIf(toInt64(f.sign), f.util_sm IS NOT NULL) > 0
ORDER BY time, gpu""",
        fmt=QueryFormat.TIME_SERIES,
        width=24,
        height=9,
    )
    bucket = "greatest($__interval_s, 60)"
    board.panel(
        stacked_usd_by_team(fill_opacity=30),
        title="Dollars per hour burning, by team",
        description="Cost per bucket scaled to an hour (minute rollup); '(unallocated)' is GPU "
        "time no job held.",
        sql=f"""SELECT
    toStartOfInterval(m.ts, INTERVAL {bucket} SECOND) AS time,
    if(m.team = '', '(unallocated)', m.team) AS team_name,
    sum(m.cost_usd) * 3600 / {bucket} AS usd_per_hour
FROM gpuledger.cost_minute AS m
WHERE $__timeFilter(m.ts) AND {all_of("m", *FILTERS)}
GROUP BY time, team_name
HAVING sum(m.rows) != 0
ORDER BY time, team_name""",
        fmt=QueryFormat.TIME_SERIES,
        width=12,
        height=8,
    )
    board.panel(
        timeseries.Panel().unit("none").legend(legend()).fill_opacity(10),
        title="Allocated vs idle GPUs",
        description="GPU-equivalents per bucket: allocated to a job, allocated but idle "
        "(util_sm under the idle threshold), and unallocated.",
        sql=f"""SELECT
    toStartOfInterval(m.ts, INTERVAL {bucket} SECOND) AS time,
    sumIf(m.gpu_seconds, m.allocated = 1) / {bucket} AS allocated_gpus,
    sum(m.idle_gpu_seconds) / {bucket} AS idle_allocated_gpus,
    sumIf(m.gpu_seconds, m.allocated = 0) / {bucket} AS unallocated_gpus
FROM gpuledger.cost_minute AS m
WHERE $__timeFilter(m.ts) AND {all_of("m", *FILTERS)}
GROUP BY time
ORDER BY time""",
        fmt=QueryFormat.TIME_SERIES,
        width=12,
        height=8,
    )
    board.panel(
        usd_table("wasted_usd").override_by_name("idle_minutes", [unit("m")]),
        title="Idle allocated GPUs",
        description="GPUs a job holds while they compute nothing (the worker's "
        "idle_allocated_gpu alerts that are firing), with the dollars wasted so far.",
        sql=f"""SELECT
    a.node AS node,
    a.gpu_uuid AS gpu_uuid,
    a.job_id AS job_id,
    a.team AS team,
    a.project AS project,
    a.since AS idle_since,
    a.idle_seconds / 60 AS idle_minutes,
    a.wasted_usd AS wasted_usd
FROM gpuledger.alerts_firing AS a
WHERE a.kind = 'idle_allocated_gpu' AND {all_of("a", *FILTERS)}
ORDER BY wasted_usd DESC
LIMIT 500""",
        width=14,
        height=9,
    )
    board.panel(
        usd_table("wasted_usd"),
        title="Firing alerts",
        description="Every alert whose latest state is firing (gpuledger.alerts_firing).",
        sql=f"""SELECT
    a.kind AS kind,
    a.since AS since,
    a.ts AS updated,
    a.node AS node,
    a.gpu_uuid AS gpu_uuid,
    a.job_id AS job_id,
    a.team AS team,
    a.project AS project,
    a.wasted_usd AS wasted_usd,
    a.message AS message
FROM gpuledger.alerts_firing AS a
WHERE {all_of("a", *FILTERS)}
ORDER BY since
LIMIT 500""",
        width=10,
        height=9,
    )
    board.panel(
        table_panel()
        .override_by_name("mean_util_sm", [unit("percentunit")])
        .override_by_name("allocated_share", [unit("percentunit")])
        .override_by_name("cost_usd", [unit("currencyUSD")])
        .override_by_name("idle_cost_usd", [unit("currencyUSD")]),
        title="Per node",
        description="Over the selected range: GPUs seen, mean SM utilization, share of GPU "
        "time allocated to jobs, cost and idle cost.",
        sql=f"""SELECT
    f.node AS node,
    uniqExact(f.gpu_uuid) AS gpus,
    if(sumIf(toInt64(f.sign), f.util_sm IS NOT NULL) > 0,
        sumIf(toFloat64(assumeNotNull(f.util_sm)) * f.duration_s * f.share * f.sign,
            f.util_sm IS NOT NULL)
        / sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.util_sm IS NOT NULL),
        NULL) AS mean_util_sm,
    sum(toFloat64(f.duration_s) * f.share * f.allocated * f.sign)
        / sum(toFloat64(f.duration_s) * f.share * f.sign) AS allocated_share,
    sum(f.cost_usd * f.sign) AS cost_usd,
    sum(f.idle_cost_usd * f.sign) AS idle_cost_usd
FROM gpuledger.cost_facts AS f
WHERE $__timeFilter(f.ts) AND {where}
GROUP BY node
HAVING sum(f.sign) != 0
ORDER BY cost_usd DESC""",
        width=24,
        height=8,
    )
    return board
