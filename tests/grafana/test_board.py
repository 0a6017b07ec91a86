"""A panel's columns are the names its SQL's SELECT list gives, read once from the SQL."""

from __future__ import annotations

import pytest

from gpuledger.grafana.board import select_columns


def test_columns_are_the_outer_select_lists_names_including_items_over_several_lines() -> None:
    sql = """SELECT
    g.gpu AS gpu,
    if(sum(g.x) > 0,
        sum(g.y) / sum(g.x),
        NULL) AS ratio,
    count()
        AS rows
FROM
(
    SELECT 1 AS inner_only
) AS g"""
    assert select_columns(sql) == ("gpu", "ratio", "rows")


def test_an_item_without_a_name_is_refused_with_its_text() -> None:
    with pytest.raises(ValueError, match=r"'sum\(h.cost_usd\)' must end with AS"):
        select_columns("SELECT\n    sum(h.cost_usd)\nFROM gpuledger.cost_hour AS h")


def test_a_query_not_laid_out_as_the_panels_are_is_refused() -> None:
    with pytest.raises(ValueError, match="starts with a line SELECT"):
        select_columns("SELECT 1 AS one")
