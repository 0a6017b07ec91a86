"""A dashboard under construction: SDK builders plus, beside each panel, its SQL and the
columns it must return, so that tests can run every query and check its shape."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import dashboard as dashboard_models

from gpuledger.grafana.clickhouse import (
    DATASOURCE_UID,
    ClickHouseQueryBuilder,
    QueryFormat,
    datasource_ref,
)

TAGS = ["gpuledger"]
_SELECT_ITEM = re.compile(r"\sAS (\w+),?$")


@dataclass(frozen=True)
class PanelSql:
    """One panel's query and the columns the panel reads, in order: the names its SELECT list
    gives (`select_columns`)."""

    dashboard_uid: str
    title: str
    sql: str
    format: QueryFormat
    columns: tuple[str, ...]


@dataclass(frozen=True)
class VariableSql:
    """A template variable filled by a query (one column of values)."""

    dashboard_uid: str
    name: str
    sql: str


def select_columns(sql: str) -> tuple[str, ...]:
    """The names of `sql`'s outer SELECT list, as the panel queries lay it out: `SELECT` on the
    first line, each item starting on a line indented four spaces (its further lines deeper)
    and ending `AS name`, up to the first line that is not indented (`FROM`)."""
    lines = sql.splitlines()
    if lines[0] != "SELECT":
        raise ValueError(f"a panel query starts with a line SELECT, got {lines[0]!r}")
    items: list[str] = []
    for line in lines[1:]:
        if not line.startswith(" "):
            break
        if line.startswith(" " * 5) and items:
            items[-1] += line
        else:
            items.append(line)
    columns = []
    for item in items:
        name = _SELECT_ITEM.search(item)
        if name is None:
            raise ValueError(f"select item {item.strip()!r} must end with AS <column name>")
        columns.append(name.group(1))
    return tuple(columns)


def selected(name: str) -> str:
    """The values chosen in variable `name`, as a ClickHouse `Array(String)`.

    Grafana's quoting formats (`singlequote`, `sqlstring`) leave backslashes alone, and in a
    ClickHouse string a backslash escapes the next character: a value ending in `\\` ends
    the literal early and the next value runs as SQL. So the values travel percent-encoded
    (`percentencode`: nothing but `A-Za-z0-9-_.~%`) and ClickHouse decodes them. Grafana
    encodes a list as `{a,b}` and a single value as itself; the commas between values are
    encoded like those inside one, so a value holding a comma reads as two.
    """
    encoded = f"'${{{name}:percentencode}}'"
    return (
        "arrayMap(v -> decodeURLComponent(v), "
        f"if(startsWith({encoded}, '%7B') AND endsWith({encoded}, '%7D'), "
        f"splitByString('%2C', substring({encoded}, 4, length({encoded}) - 6)), [{encoded}]))"
    )


def all_of(alias: str, *variables: str) -> str:
    """`alias.var` among the selected values for each variable; `1=1` where it is All."""
    prefix = f"{alias}." if alias else ""
    return " AND ".join(
        f"$__conditionalAll(has({selected(name)}, {prefix}{name}), ${name})" for name in variables
    )


def tagged(alias: str, *tags: str) -> str:
    """The row's job carries a selected value of each tag variable (`model`, `environment`);
    `1=1` where it is All. The minute and hour rollups know a row's job but not its tags: the
    jobs come from the job, GPU and hour rollup, which does."""
    return " AND ".join(
        f"$__conditionalAll({alias}.job_id IN (SELECT t.job_id FROM gpuledger.cost_job_gpu_hour "
        f"AS t WHERE has({selected(name)}, t.{name})), ${name})"
        for name in tags
    )


class Board:
    """Collects panels (with their SQL) and variables; `build()` gives the SDK model."""

    def __init__(
        self,
        uid: str,
        title: str,
        *,
        description: str,
        time_from: str,
        refresh: str | None,
        datasource_uid: str = DATASOURCE_UID,
    ) -> None:
        self.uid = uid
        self.datasource_uid = datasource_uid
        self.builder = (
            dashboard_builders.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(TAGS)
            .timezone("utc")
            .time(time_from, "now")
            .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
            .readonly()
        )
        if refresh:
            self.builder = self.builder.refresh(refresh)
        self.panels: list[PanelSql] = []
        self.variables: list[VariableSql] = []
        self._next_id = 1

    def variable(self, name: str, label: str, sql: str) -> None:
        """A multi-value query variable with "All", refreshed when the time range changes."""
        self.variables.append(VariableSql(self.uid, name, sql))
        self.builder = self.builder.with_variable(
            dashboard_builders.QueryVariable(name)
            .label(label)
            .query(sql)
            .datasource(datasource_ref(self.datasource_uid))
            .multi(True)
            .include_all(True)
            .current(dashboard_models.VariableOption(text="All", value=["$__all"], selected=True))
            .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
        )

    def panel(
        self,
        panel: Any,
        *,
        title: str,
        sql: str,
        fmt: QueryFormat = QueryFormat.TABLE,
        width: int = 12,
        height: int = 8,
        description: str = "",
    ) -> None:
        """Add `panel` (an SDK panel builder) with one ClickHouse target running `sql`."""
        self.panels.append(PanelSql(self.uid, title, sql, fmt, select_columns(sql)))
        target = ClickHouseQueryBuilder().sql(sql).ref_id("A").datasource_uid(self.datasource_uid)
        target = target.time_series() if fmt is QueryFormat.TIME_SERIES else target.table()
        built: cogbuilder.Builder[dashboard_models.Panel] = (
            panel.id(self._next_id)
            .title(title)
            .description(description)
            .datasource(datasource_ref(self.datasource_uid))
            .with_target(target)
            .span(width)
            .height(height)
        )
        self._next_id += 1
        self.builder = self.builder.with_panel(built)

    def row(self, title: str) -> None:
        self.builder = self.builder.with_row(dashboard_builders.Row(title).id(self._next_id))
        self._next_id += 1

    def build(self) -> dashboard_models.Dashboard:
        return self.builder.build()
