"""Template variables with quotes and backslashes in their values: the panels' SQL, with the
values formatted exactly as Grafana formats them, runs on the real engine, filters to exactly
the chosen teams and projects, and never runs a value as SQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from gpuledger.grafana.board import PanelSql
from gpuledger.grafana.macros import (
    ALL,
    QueryContext,
    apply_backend_macros,
    apply_conditional_all,
    expand,
    format_csv,
    format_percentencode,
    format_pipe,
    format_raw,
    format_singlequote,
    format_sqlstring,
)
from gpuledger.grafana.provisioning import boards, dashboard_json
from gpuledger.store import connect, ensure_store, stop_owned_stores
from tests.grafana.seed import END, FACT_COLUMNS, START, fact_rows, seed

pytestmark = pytest.mark.integration

ODD_NAMES = [
    "o'brien",
    "back\\slash",
    "x\\' OR 1=1 --",
    "x\\') OR 1=1 --",
    "trailing\\",
    'say "hi"',
    ") OR 1=1 --",
    "%7Bbraced%7D and 100%",
    "ünïcødé team",
]
VARIABLES = {
    "node": [ALL],
    "team": [ALL],
    "project": [ALL],
    "model": [ALL],
    "environment": [ALL],
}


@pytest.fixture(scope="module")
def odd_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """The seeded fleet plus, for each odd name, a copy of team `search`'s facts under a team
    and a project of that name."""
    path: Path = tmp_path_factory.mktemp("odd-names") / "store"
    ensure_store(path)
    client = connect(f"chdb://{path.resolve()}", start=False)
    seed(client)
    team, project, job = (FACT_COLUMNS.index(c) for c in ("team", "project", "job_id"))
    search = [row for row in fact_rows() if row[team] == "search"]
    copies = []
    for number, name in enumerate(ODD_NAMES):
        for row in search:
            copy = list(row)
            copy[team], copy[project], copy[job] = name, name, f"odd-{number}"
            copies.append(copy)
    client.insert("gpuledger.cost_facts", copies, column_names=FACT_COLUMNS)
    yield client
    client.close()
    stop_owned_stores(path)


def context(**chosen: list[str]) -> QueryContext:
    return QueryContext(START, END, interval_s=60, variables={**VARIABLES, **chosen})


def panel(title: str) -> PanelSql:
    return next(p for b in boards() for p in b.panels if p.title == title)


def run(client: Client, sql: str) -> tuple[list[str], list[Any]]:
    result = client.query(sql)
    return list(result.column_names), list(result.result_rows)


# -- the formats, as Grafana's format registry writes them --------------------------------
def test_the_formats_are_grafanas_own() -> None:
    # singlequote escapes a quote with a backslash and leaves backslashes alone.
    assert format_singlequote(["o'brien", "a\\"]) == "'o\\'brien','a\\'"
    # sqlstring doubles a quote, backslash-escapes a double quote, leaves backslashes alone.
    assert format_sqlstring(["o'b\"x\\"]) == "'o''b\\\"x\\'"
    # percentencode: encodeURIComponent plus !'()*, a list as {a,b}, a single value bare.
    assert format_percentencode(["o'brien", "a b"]) == "%7Bo%27brien%2Ca%20b%7D"
    assert format_percentencode("(é)*!~-_.") == "%28%C3%A9%29%2A%21~-_."
    assert format_percentencode("x\\' OR 1=1 --") == "x%5C%27%20OR%201%3D1%20--"
    assert format_csv(["a", "b"]) == format_raw(["a", "b"]) == "a,b"
    assert format_pipe(["a", "b"]) == "a|b"


def test_grafanas_quoting_formats_let_a_backslash_end_a_clickhouse_string(
    odd_fleet: Client,
) -> None:
    # Why the panels do not use them: each of these filters should match no row at all.
    total = odd_fleet.query("SELECT count() FROM gpuledger.cost_facts").result_rows[0][0]
    for fmt, values in (
        ("singlequote", ["x\\') OR 1=1 --"]),
        ("sqlstring", ["x\\", ") OR 1=1 --"]),
    ):
        sql = f"SELECT count() FROM gpuledger.cost_facts WHERE team IN (${{team:{fmt}}})\n"
        injected = odd_fleet.query(expand(sql, context(team=values))).result_rows[0][0]
        assert injected == total > 0, fmt


# -- the panels ---------------------------------------------------------------------------
def test_panels_name_variables_only_through_percentencode() -> None:
    for board in boards():
        text = str(dashboard_json(board))
        assert ":singlequote}" not in text and ":sqlstring}" not in text
        for sql in [p.sql for p in board.panels]:
            chosen = apply_conditional_all(
                sql,
                context(team=["t"], project=["p"], node=["n"], model=["m"], environment=["e"]),
            )
            stripped = chosen.replace(":percentencode}", "")
            for name in VARIABLES:
                assert f"${name}" not in stripped and f"${{{name}}}" not in stripped, sql


@pytest.mark.parametrize("name", ODD_NAMES)
def test_a_team_with_quotes_or_backslashes_is_filtered_exactly(
    odd_fleet: Client, name: str
) -> None:
    columns, rows = run(odd_fleet, expand(panel("Cost by team").sql, context(team=[name])))
    assert [r[columns.index("team_name")] for r in rows] == [name]
    cost = rows[0][columns.index("cost_usd")]
    columns, rows = run(odd_fleet, expand(panel("Cost by team").sql, context(team=["search"])))
    assert cost == pytest.approx(rows[0][columns.index("cost_usd")])
    columns, rows = run(odd_fleet, expand(panel("Cost by project").sql, context(project=[name])))
    assert [r[0] for r in rows] == [name]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_every_panel_runs_with_an_odd_team_and_project(odd_fleet: Client, name: str) -> None:
    ctx = context(team=[name], project=[name])
    for board in boards():
        for one in board.panels:
            columns, rows = run(odd_fleet, expand(one.sql, ctx))
            # (An empty answer comes without column names.)
            assert not rows or tuple(columns) == one.columns, one.title


def test_two_odd_teams_together_select_those_two_only(odd_fleet: Client) -> None:
    chosen = ["trailing\\", ") OR 1=1 --"]
    columns, rows = run(odd_fleet, expand(panel("Cost by team").sql, context(team=chosen)))
    assert sorted(r[columns.index("team_name")] for r in rows) == sorted(chosen)


def test_a_single_value_variable_is_decoded_too(odd_fleet: Client) -> None:
    # Grafana hands a single-value variable to the format as a string, not a list.
    for name in ("o'brien", "x\\') OR 1=1 --", "trailing\\"):
        sql = apply_conditional_all(panel("Cost by team").sql, context(team=[name]))
        sql = sql.replace("${team:percentencode}", format_percentencode(name))
        sql = apply_backend_macros(expand(sql, context(team=[name])), context())
        columns, rows = run(odd_fleet, sql)
        assert [r[columns.index("team_name")] for r in rows] == [name]
