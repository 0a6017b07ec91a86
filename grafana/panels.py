"""Panel pieces both dashboards share: units, the bottom legend, tables and the stacked
per-team dollar series."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import table, timeseries
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models


def unit(name: str) -> dashboard_models.DynamicConfigValue:
    return dashboard_models.DynamicConfigValue(id_val="unit", value=name)


def legend(
    placement: common_models.LegendPlacement = common_models.LegendPlacement.BOTTOM,
) -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common_models.LegendDisplayMode.LIST)
        .placement(placement)
        .show_legend(True)
    )


def table_panel() -> table.Panel:
    return table.Panel().show_header(True)


def usd_table(*money: str, percent: tuple[str, ...] = ()) -> table.Panel:
    """A table whose `money` columns are dollars and `percent` columns fractions."""
    panel = table_panel()
    for name in money:
        panel = panel.override_by_name(name, [unit("currencyUSD")])
    for name in percent:
        panel = panel.override_by_name(name, [unit("percentunit")])
    return panel


def stacked_usd_by_team(*, fill_opacity: int, bars: bool = False) -> timeseries.Panel:
    """Dollars over time, one stacked series per `team_name` (the query's label column)."""
    panel = (
        timeseries.Panel()
        .unit("currencyUSD")
        .fill_opacity(fill_opacity)
        .stacking(common_builders.StackingConfig().mode(common_models.StackingMode.NORMAL))
        .legend(legend())
        .display_name("${__field.labels.team_name}")
    )
    return panel.draw_style(common_models.GraphDrawStyle.BARS) if bars else panel
