"""The ClickHouse data source plugin's query, as a grafana-foundation-sdk data query.

The SDK ships no ClickHouse query type (ARCHITECTURE.md §5), so this module writes the target the
way `grafana-clickhouse-datasource` (v4) stores it in a dashboard: `editorType: "sql"`,
`rawSql`, `queryType` (`table` | `timeseries`) and the backend's `format` number (sqlds:
0 = time series, 1 = table). Registering the variant lets `Dashboard.from_json` read our
targets back as `ClickHouseQuery` objects instead of the SDK's untyped bag.
"""

from __future__ import annotations

import enum
from typing import Any, Self

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard as dashboard_models

PLUGIN_ID = "grafana-clickhouse-datasource"
DATASOURCE_UID = "gpuledger-clickhouse"
DATASOURCE_NAME = "gpuledger ClickHouse"


class QueryFormat(enum.IntEnum):
    """sqlds' FormatQueryOption, which the plugin's backend reads from `format`."""

    TIME_SERIES = 0
    TABLE = 1

    @property
    def query_type(self) -> str:
        return "timeseries" if self is QueryFormat.TIME_SERIES else "table"


def datasource_ref(uid: str = DATASOURCE_UID) -> dashboard_models.DataSourceRef:
    return dashboard_models.DataSourceRef(type_val=PLUGIN_ID, uid=uid)


class ClickHouseQuery(cogvariants.Dataquery):
    """One SQL target of the ClickHouse plugin."""

    def __init__(
        self,
        raw_sql: str = "",
        format_val: QueryFormat = QueryFormat.TABLE,
        ref_id: str = "A",
        datasource_uid: str = DATASOURCE_UID,
        hide: bool | None = None,
    ) -> None:
        self.raw_sql = raw_sql
        self.format_val = QueryFormat(format_val)
        self.ref_id = ref_id
        self.datasource_uid = datasource_uid
        self.hide = hide

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "refId": self.ref_id,
            "datasource": {"type": PLUGIN_ID, "uid": self.datasource_uid},
            "editorType": "sql",
            "queryType": self.format_val.query_type,
            "format": int(self.format_val),
            "rawSql": self.raw_sql,
        }
        if self.hide is not None:
            payload["hide"] = self.hide
        return payload

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        datasource = data.get("datasource") or {}
        return cls(
            raw_sql=str(data.get("rawSql", "")),
            format_val=QueryFormat(int(data.get("format", QueryFormat.TABLE))),
            ref_id=str(data.get("refId", "A")),
            datasource_uid=str(datasource.get("uid", DATASOURCE_UID)),
            hide=data.get("hide"),
        )


class ClickHouseQueryBuilder(cogbuilder.Builder[ClickHouseQuery]):
    """Builder in the SDK's style: `ClickHouseQueryBuilder().sql(...).time_series()`."""

    def __init__(self) -> None:
        self._internal = ClickHouseQuery()

    def build(self) -> ClickHouseQuery:
        return self._internal

    def sql(self, raw_sql: str) -> Self:
        self._internal.raw_sql = raw_sql
        return self

    def time_series(self) -> Self:
        self._internal.format_val = QueryFormat.TIME_SERIES
        return self

    def table(self) -> Self:
        self._internal.format_val = QueryFormat.TABLE
        return self

    def ref_id(self, ref_id: str) -> Self:
        self._internal.ref_id = ref_id
        return self

    def datasource_uid(self, uid: str) -> Self:
        self._internal.datasource_uid = uid
        return self


def register() -> None:
    """Teach the SDK's JSON decoder the stock panels and our query type (idempotent)."""
    plugins.register_default_plugins()
    cogruntime.register_dataquery_variant(
        cogruntime.DataqueryConfig(identifier=PLUGIN_ID, from_json_hook=ClickHouseQuery.from_json)
    )
