"""Grafana-managed alert rules as code: idle allocated GPUs and budget burn.

Each rule is one ClickHouse query (a table: string columns become the alert's labels, the
one number is its value; each row's labels must be unique, so budget alerts are counted per
team and project) and a threshold expression. The idle and budget rules mirror the
episodes the stream worker decided (`gpuledger.alerts_firing`, ARCHITECTURE.md §3.6), so Grafana
and the worker never disagree on what is idle; the team burn-rate rule needs no worker at
all and fires when a team's last hour, scaled to an hour, costs more than a set amount.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from grafana_foundation_sdk.builders import alerting as alerting_builders
from grafana_foundation_sdk.builders import expr as expr_builders
from grafana_foundation_sdk.models import alerting as alerting_models
from grafana_foundation_sdk.models import dashboard as dashboard_models

from gpuledger.grafana.clickhouse import DATASOURCE_UID, ClickHouseQueryBuilder

FOLDER_UID = "gpuledger"
FOLDER_TITLE = "gpuledger"
GROUP = "gpuledger"
GROUP_INTERVAL_S = 60
ORG_ID = 1

EXPRESSION_DATASOURCE = dashboard_models.DataSourceRef(type_val="__expr__", uid="__expr__")


@dataclass(frozen=True)
class RuleSql:
    """A rule's data query, the look-back it is evaluated over, and its value column."""

    uid: str
    title: str
    sql: str
    lookback_s: int
    labels: tuple[str, ...]
    value: str


IDLE_SQL = """SELECT
    a.gpu_uuid AS gpu_uuid,
    a.node AS node,
    a.job_id AS job_id,
    a.team AS team,
    a.project AS project,
    a.idle_seconds AS idle_seconds
FROM gpuledger.alerts_firing AS a
WHERE a.kind = 'idle_allocated_gpu'"""

BUDGET_SQL = """SELECT
    a.team AS team,
    a.project AS project,
    toFloat64(count()) AS budget_alerts
FROM gpuledger.alerts_firing AS a
WHERE a.kind = 'budget_burn'
GROUP BY team, project"""

BURN_SQL = """SELECT
    if(m.team = '', '(unallocated)', m.team) AS team_name,
    sum(m.cost_usd) * 3600 / greatest(dateDiff('second', $__fromTime, $__toTime), 1)
        AS usd_per_hour
FROM gpuledger.cost_minute AS m
WHERE $__timeFilter(m.ts)
GROUP BY team_name
HAVING sum(m.rows) != 0"""


def rule_queries(lookback_s: int = 3600) -> list[RuleSql]:
    return [
        RuleSql(
            "gpuledger-idle-allocated-gpu",
            "Idle allocated GPU",
            IDLE_SQL,
            600,
            ("gpu_uuid", "node", "job_id", "team", "project"),
            "idle_seconds",
        ),
        RuleSql(
            "gpuledger-budget-burn",
            "Budget burn",
            BUDGET_SQL,
            600,
            ("team", "project"),
            "budget_alerts",
        ),
        RuleSql(
            "gpuledger-team-burn-rate",
            "Team burn rate above limit",
            BURN_SQL,
            lookback_s,
            ("team_name",),
            "usd_per_hour",
        ),
    ]


def _rule(
    spec: RuleSql,
    *,
    threshold: float,
    summary: str,
    description: str,
    severity: Literal["warning", "critical"],
    datasource_uid: str,
    folder_uid: str,
) -> alerting_builders.Rule:
    data = (
        alerting_builders.Query("A")
        .datasource_uid(datasource_uid)
        .relative_time_range(alerting_models.RelativeTimeRange(from_val=spec.lookback_s, to=0))
        .model(
            ClickHouseQueryBuilder()
            .sql(spec.sql)
            .table()
            .ref_id("A")
            .datasource_uid(datasource_uid)
        )
    )
    condition = (
        alerting_builders.Query("C")
        .datasource_uid("__expr__")
        .relative_time_range(alerting_models.RelativeTimeRange(from_val=spec.lookback_s, to=0))
        .model(
            expr_builders.TypeThreshold()
            .ref_id("C")
            .datasource(EXPRESSION_DATASOURCE)
            .expression("A")
            .conditions(
                [
                    expr_builders.ExprTypeThresholdConditions().evaluator(
                        expr_builders.ExprTypeThresholdConditionsEvaluator()
                        .type("gt")
                        .params([threshold])
                    )
                ]
            )
        )
    )
    return (
        alerting_builders.Rule(spec.title)
        .uid(spec.uid)
        .org_id(ORG_ID)
        .folder_uid(folder_uid)
        .rule_group(GROUP)
        .condition("C")
        .queries([data, condition])
        .for_val("0s")
        .no_data_state("OK")
        .exec_err_state("Error")
        .labels({"source": "gpuledger", "severity": severity})
        .annotations({"summary": summary, "description": description})
    )


def build_rules(
    *,
    team_usd_per_hour: float = 500.0,
    datasource_uid: str = DATASOURCE_UID,
    folder_uid: str = FOLDER_UID,
) -> list[alerting_models.Rule]:
    """The rules, as the SDK's models (Grafana's provisioning API shape)."""
    if team_usd_per_hour <= 0:
        raise ValueError(
            f"team_usd_per_hour must be > 0, got {team_usd_per_hour}; it is the USD per hour a "
            "team may burn before the burn-rate rule fires"
        )
    idle, budget, burn = rule_queries()
    common = {"datasource_uid": datasource_uid, "folder_uid": folder_uid}
    return [
        _rule(
            idle,
            threshold=0,
            severity="warning",
            summary="GPU {{ $labels.gpu_uuid }} on {{ $labels.node }} is allocated and idle",
            description="Job {{ $labels.job_id }} ({{ $labels.team }}/{{ $labels.project }}) "
            "holds GPU {{ $labels.gpu_uuid }} on {{ $labels.node }}, idle for "
            "{{ humanizeDuration $values.A.Value }}. See the GPU fleet live board for the "
            "dollars wasted.",
            **common,
        ).build(),
        _rule(
            budget,
            threshold=0,
            severity="warning",
            summary="Budget burn: {{ $labels.team }} {{ $labels.project }}",
            description="The worker reports {{ $values.A.Value }} budget_burn alert(s) for team "
            "{{ $labels.team }}, project {{ $labels.project }} (gpuledger alerts).",
            **common,
        ).build(),
        _rule(
            burn,
            threshold=team_usd_per_hour,
            severity="critical",
            summary="Team {{ $labels.team_name }} burns more than "
            f"{team_usd_per_hour:g} USD per hour",
            description="Over the last hour team {{ $labels.team_name }} spent at "
            '{{ $values.A.Value | printf "%.2f" }} USD per hour on GPUs, above the limit of '
            f"{team_usd_per_hour:g}.",
            **common,
        ).build(),
    ]
