"""Every panel, variable and alert query, with the ClickHouse plugin's macros expanded for a
concrete range, runs on the real engine (chdb behind the store's HTTP interface, through
clickhouse-connect) against a seeded fleet and returns the columns its panel reads."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from grafana_foundation_sdk.models.dashboard import Panel

from gpuledger.grafana import alert_rules, cost_explorer, fleet_live
from gpuledger.grafana.board import Board, PanelSql
from gpuledger.grafana.clickhouse import PLUGIN_ID, ClickHouseQuery, QueryFormat
from gpuledger.grafana.macros import ALL, QueryContext, expand
from gpuledger.grafana.provisioning import (
    boards,
    dashboard_json,
    load_dashboard,
    load_rule,
    rules_json,
    to_plain,
)
from tests.grafana.seed import END, START

pytestmark = pytest.mark.integration

VARIABLES = {
    "node": [ALL],
    "team": [ALL],
    "project": [ALL],
    "model": [ALL],
    "environment": [ALL],
}
WHOLE_RANGE = QueryContext(START, END, interval_s=60, variables=VARIABLES)


def every_panel() -> list[PanelSql]:
    return [p for b in boards() for p in b.panels]


def run(client: Client, sql: str, ctx: QueryContext = WHOLE_RANGE) -> tuple[list[str], list[Any]]:
    result = client.query(expand(sql, ctx))
    return list(result.column_names), list(result.result_rows)


def by_title(title: str) -> PanelSql:
    return next(p for p in every_panel() if p.title == title)


def test_export_has_two_dashboards_with_twenty_three_panels() -> None:
    built = {b.uid: b for b in boards()}
    assert set(built) == {fleet_live.UID, cost_explorer.UID}
    assert len(built[fleet_live.UID].panels) == 9
    assert len(built[cost_explorer.UID].panels) == 14
    titles = [p.title for p in every_panel()]
    assert len(titles) == len(set(titles)), "panel titles must be unique per export"


@pytest.mark.parametrize("panel", every_panel(), ids=lambda p: p.title)
def test_every_panel_query_runs_and_returns_its_columns(seeded: Client, panel: PanelSql) -> None:
    columns, rows = run(seeded, panel.sql)
    assert tuple(columns) == panel.columns
    assert rows, f"{panel.title}: no rows for the seeded fleet"
    if panel.format is QueryFormat.TIME_SERIES:
        assert columns[0] == "time"
        times = [r[0] for r in rows]
        assert times == sorted(times), "time series must come ordered by time"
        assert START.replace(tzinfo=None) <= times[0] and times[-1] <= END.replace(tzinfo=None)


@pytest.mark.parametrize("board", boards(), ids=lambda b: b.uid)
def test_variable_queries_list_the_fleets_values(seeded: Client, board: Board) -> None:
    expected = {
        "node": ["node-a", "node-b", "node-c"],
        "team": ["research", "search", "vision"],
        "project": ["detector", "notebooks", "ranker"],
        "model": ["ranker-v3", "yolo-v9"],
        "environment": ["dev", "prod", "research"],
    }
    for variable in board.variables:
        columns, rows = run(seeded, variable.sql)
        assert len(columns) == 1
        assert [r[0] for r in rows] == expected[variable.name]


def test_team_variable_narrows_every_panel_to_that_team(seeded: Client) -> None:
    vision = QueryContext(START, END, interval_s=60, variables={**VARIABLES, "team": ["vision"]})
    columns, rows = run(seeded, by_title("Cost by team").sql, vision)
    assert [r[columns.index("team_name")] for r in rows] == ["vision"]
    columns, rows = run(seeded, by_title("Per node").sql, vision)
    assert sorted(r[0] for r in rows) == ["node-a", "node-c"]
    columns, rows = run(seeded, by_title("Idle allocated GPUs").sql, vision)
    assert rows == []  # vision's idle episode resolved; nb-1 belongs to research


def test_model_and_environment_variables_narrow_the_panels_to_those_jobs(seeded: Client) -> None:
    prod = QueryContext(START, END, interval_s=60, variables={**VARIABLES, "environment": ["prod"]})
    columns, rows = run(seeded, by_title("Cost by team").sql, prod)
    assert [r[columns.index("team_name")] for r in rows] == ["search"]  # infer-1 alone
    columns, rows = run(seeded, by_title("Cost per model and environment").sql)
    got = {(r[0], r[1]): r[columns.index("cost_usd")] for r in rows}
    facts = seeded.query(
        "SELECT model, environment, sum(cost_usd * sign) FROM gpuledger.cost_facts "
        "WHERE job_id != '' GROUP BY model, environment"
    ).result_rows
    want = {(m or "(none)", e or "(none)"): usd for m, e, usd in facts}
    assert got == pytest.approx(want)
    yolo = QueryContext(START, END, interval_s=60, variables={**VARIABLES, "model": ["yolo-v9"]})
    _, runs = run(seeded, by_title("Cost per training run").sql, yolo)
    assert sorted(r[0] for r in runs) == ["train-1", "train-2"]


def test_multi_value_selection_of_two_projects(seeded: Client) -> None:
    two = QueryContext(
        START, END, interval_s=60, variables={**VARIABLES, "project": ["ranker", "notebooks"]}
    )
    _columns, rows = run(seeded, by_title("Cost by project").sql, two)
    assert sorted(r[0] for r in rows) == ["notebooks", "ranker"]


def test_fleet_now_counts_allocated_idle_and_unallocated_gpus(seeded: Client) -> None:
    columns, rows = run(seeded, by_title("GPUs now: allocated vs idle").sql)
    now = dict(zip(columns, rows[0], strict=True))
    # In the last minute: a0 unallocated, a1 0.6 train-2, b0 infer-1, b1 nb-1 (idle), c1
    # unallocated; MIG-c0's job ended at 11:00.
    assert now["gpus"] == 5
    assert now["allocated"] == pytest.approx(2.6, abs=1e-6)
    assert now["idle_allocated"] == pytest.approx(1.0)
    assert now["unallocated"] == pytest.approx(2.4, abs=1e-6)


def test_idle_table_shows_the_firing_episode_with_its_wasted_dollars(seeded: Client) -> None:
    columns, rows = run(seeded, by_title("Idle allocated GPUs").sql)
    assert len(rows) == 1
    row = dict(zip(columns, rows[0], strict=True))
    assert (row["gpu_uuid"], row["job_id"], row["team"]) == ("GPU-b1", "nb-1", "research")
    assert row["idle_minutes"] == pytest.approx(115)
    assert row["wasted_usd"] == pytest.approx(115 * 1.5 * 0.99 / 60)


def test_cancelled_first_minute_counts_once_for_the_inference_job(seeded: Client) -> None:
    columns, rows = run(seeded, by_title("Cost per 1,000 inferences").sql)
    row = dict(zip(columns, rows[0], strict=True))
    assert row["job_id"] == "infer-1"
    assert row["cost_usd"] == pytest.approx(2 * 1.5)  # two hours of a 1.5 USD/h spot GPU
    assert row["requests"] == 120 * 600
    assert row["usd_per_1k_requests"] == pytest.approx(1000 * 3.0 / 72_000)


def test_cost_totals_agree_between_boards_and_with_the_facts(seeded: Client) -> None:
    facts = seeded.query("SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts").result_rows[0][0]
    _, explorer = run(seeded, by_title("Total cost").sql)
    _, fleet = run(seeded, by_title("Spent in range").sql)
    assert explorer[0][0] == pytest.approx(facts)
    assert fleet[0][0] == pytest.approx(facts)


def test_effective_cost_panel_over_all_time_equals_the_analyst_view(seeded: Client) -> None:
    everything = QueryContext(
        START - timedelta(days=1), END + timedelta(days=1), interval_s=3600, variables=VARIABLES
    )
    columns, rows = run(seeded, by_title("EffectiveCost per project").sql, everything)
    view = seeded.query(
        f"SELECT {', '.join(columns)} FROM gpuledger.project_effective_cost "
        "ORDER BY total_spend_usd DESC"
    ).result_rows
    assert len(rows) == len(view)
    for got, want in zip(rows, view, strict=True):
        assert got[0] == want[0]
        # The panel sums the hour rollup, the view the minute one: the same money, summed in
        # another order. An empty EffectiveCost is empty in both.
        for a, b in zip(got[1:], want[1:], strict=True):
            assert a == b if b is None else a == pytest.approx(b)
    detector = dict(zip(columns, rows[0], strict=True))
    assert detector["project"] == "detector"
    assert detector["jobs_finished"] == 3 and detector["jobs_succeeded"] == 1


def test_effective_cost_panel_keeps_the_chosen_projects_with_all_their_teams(
    seeded: Client,
) -> None:
    everything = QueryContext(
        START - timedelta(days=1),
        END + timedelta(days=1),
        interval_s=3600,
        variables={**VARIABLES, "project": ["detector"], "team": ["nobody"]},
    )
    columns, rows = run(seeded, by_title("EffectiveCost per project").sql, everything)
    view = seeded.query(
        f"SELECT {', '.join(columns)} FROM gpuledger.project_effective_cost "
        "WHERE project = 'detector'"
    ).result_rows
    assert [r[0] for r in rows] == ["detector"]
    assert rows[0][1] == pytest.approx(view[0][1]) and rows[0][1] > 0


def test_the_funnel_panel_narrows_stage_by_stage_and_totals_the_facts(seeded: Client) -> None:
    columns, rows = run(seeded, by_title("Fleet funnel").sql, WHOLE_RANGE)
    found = [dict(zip(columns, row, strict=True)) for row in rows]
    facts = seeded.query("SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts").result_rows
    assert sum(r["total_usd"] for r in found) == pytest.approx(facts[0][0])
    for r in found:
        assert r["total_usd"] + 1e-9 >= r["allocated_usd"] >= r["active_usd"] - 1e-9
        assert r["active_usd"] + 1e-9 >= r["effective_usd"] >= 0


def test_training_run_cost_is_the_whole_run(seeded: Client) -> None:
    columns, rows = run(seeded, by_title("Cost per training run").sql)
    runs = {r[0]: dict(zip(columns, r, strict=True)) for r in rows}
    assert set(runs) == {"train-1", "train-2"}
    assert runs["train-1"]["cost_usd"] == pytest.approx(2 * 1.5 * 4.0)  # 2 GPUs, 1.5 h, 4 USD/h
    assert runs["train-1"]["state"] == "succeeded"


@pytest.mark.parametrize("rule", alert_rules.rule_queries(), ids=lambda r: r.uid)
def test_alert_rule_queries_run_with_their_lookback(seeded: Client, rule: Any) -> None:
    ctx = QueryContext(END - timedelta(seconds=rule.lookback_s), END, interval_s=1)
    columns, rows = run(seeded, rule.sql, ctx)
    assert tuple(columns) == (*rule.labels, rule.value)
    assert rows, f"{rule.uid}: the seeded fleet should make this rule fire"
    assert all(isinstance(r[-1], float) for r in rows)
    # Grafana needs one row per label set, or the rule errors instead of firing.
    assert len({r[:-1] for r in rows}) == len(rows)


def test_burn_rate_rule_fires_only_above_the_limit(seeded: Client) -> None:
    burn = alert_rules.rule_queries()[2]
    ctx = QueryContext(END - timedelta(hours=1), END, interval_s=1)
    _columns, rows = run(seeded, burn.sql, ctx)
    rates = dict(rows)
    # Last hour: vision = train-1's 2 GPUs for 30 min + train-2's 0.6 GPU for 30 min at 4 USD/h.
    assert rates["vision"] == pytest.approx((2 * 0.5 + 0.6 * 0.5) * 4.0)
    rule = next(r for r in rules_json(team_usd_per_hour=5) if r["uid"] == burn.uid)
    threshold = rule["data"][1]["model"]["conditions"][0]["evaluator"]["params"][0]
    assert [team for team, rate in rows if rate > threshold] == ["vision"]


def test_dashboards_load_back_into_the_sdk_models() -> None:
    for board in boards():
        exported = dashboard_json(board)
        loaded = load_dashboard(exported)
        assert loaded.uid == board.uid
        panels = loaded.panels or []
        assert len(panels) == len(board.panels)
        for panel, spec in zip(panels, board.panels, strict=True):
            assert panel.title == spec.title
            assert isinstance(panel, Panel)
            (target,) = panel.targets or []
            assert isinstance(target, ClickHouseQuery)
            assert target.raw_sql == spec.sql and target.format_val is spec.format
            assert panel.datasource is not None and panel.datasource.type_val == PLUGIN_ID
        names = [v.name for v in loaded.templating.list_val or []]
        assert names == [v.name for v in board.variables]
        # The SDK fills panel defaults (empty `custom` field config) on load; after that a
        # load and write changes nothing.
        again = to_plain(loaded)
        assert to_plain(load_dashboard(again)) == again


def test_alert_rules_load_back_into_the_sdk_models() -> None:
    for rule in rules_json():
        loaded = load_rule(rule)
        assert loaded.uid == rule["uid"] and loaded.condition == "C"
        data = loaded.data or []
        assert isinstance(data[0].model, ClickHouseQuery)
        assert data[0].model.format_val is QueryFormat.TABLE
