"""What Grafana and the ClickHouse plugin do to a panel's SQL before ClickHouse sees it.

Two stages, in the order they happen:

1. Grafana's front end (the plugin's `applyTemplateVariables`, src/data/CHDatasource.ts):
   `$__conditionalAll(cond, $var)` becomes `1=1` when `$var` is "All" (or empty), then
   template variables are replaced by Grafana's template service: `${var:FORMAT}` through
   Grafana's format registry (`FORMATS` below), a bare `$var` / `${var}` / `[[var]]` through
   the plugin's own format (a list joined as `'a','b'`, a single value unquoted; no escaping).
2. The plugin's back end (pkg/macros/macros.go, v4): `$__timeFilter(c)` →
   `c >= toDateTime(from) AND c <= toDateTime(to)`, `$__timeFilter_ms(c)`,
   `$__dateFilter(c)`, `$__fromTime` / `$__toTime` → `toDateTime(epoch seconds)`,
   `$__fromTime_ms` / `$__toTime_ms` → `fromUnixTimestamp64Milli(ms)`,
   `$__timeInterval(c)` → `toStartOfInterval(toDateTime(c), INTERVAL n second)` and
   `$__interval_s` → n (at least 1).

`expand` does both for a concrete range so that tests run every panel's SQL on the real
engine. It is a model of the plugin, written from its source; a live Grafana was not run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

from gpuledger.schema.sqltext import split_commas

ALL = "$__all"


class MacroError(ValueError):
    """A macro or variable the expander cannot resolve; the message names it."""


@dataclass(frozen=True)
class QueryContext:
    """The time range, interval and variable values of one panel refresh."""

    time_from: datetime
    time_to: datetime
    interval_s: float = 60.0
    # Variable name -> selected values; [ALL] (or an empty list) means "All".
    variables: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # Variable name -> every option, which is what "All" expands to without a custom value.
    options: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, moment in (("time_from", self.time_from), ("time_to", self.time_to)):
            if moment.tzinfo is None:
                raise MacroError(f"{name} must be timezone-aware (UTC), got {moment!r}")
        if self.time_to < self.time_from:
            raise MacroError(
                f"time_to {self.time_to.isoformat()} is before time_from "
                f"{self.time_from.isoformat()}; swap them"
            )

    def values(self, name: str) -> list[str]:
        if name not in self.variables:
            raise MacroError(
                f"template variable ${name} has no value; give it one in QueryContext.variables"
            )
        chosen = list(self.variables[name])
        if not chosen or chosen == [ALL]:
            return list(self.options.get(name, []))
        return chosen

    def is_all(self, name: str) -> bool:
        chosen = list(self.variables.get(name, []))
        return not chosen or chosen == [ALL]


def _macro_args(sql: str, open_paren: int) -> tuple[list[str], int]:
    """The comma-separated arguments of the call whose `(` is at `open_paren`, and the index
    just after its `)`; commas inside nested parentheses or quotes stay in their argument."""
    args, close = split_commas(sql, open_paren + 1)
    if close < 0:
        raise MacroError(
            f"unbalanced parentheses after {sql[max(0, open_paren - 20) : open_paren]!r}"
        )
    return args, close + 1


_VARIABLE_IN_ARG = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def apply_conditional_all(sql: str, ctx: QueryContext) -> str:
    """`$__conditionalAll(condition, $var)` → `1=1` when $var is All, else the condition."""
    macro = "$__conditionalAll("
    while (index := sql.rfind(macro)) != -1:
        args, end = _macro_args(sql, index + len(macro) - 1)
        if len(args) != 2:
            raise MacroError(f"$__conditionalAll takes 2 arguments, got {len(args)}: {args!r}")
        match = _VARIABLE_IN_ARG.search(args[1])
        if match is None:
            raise MacroError(f"$__conditionalAll's second argument names no variable: {args[1]!r}")
        name = next(g for g in match.groups() if g)
        phrase = "1=1" if ctx.is_all(name) else args[0]
        sql = sql[:index] + phrase + sql[end:]
    return sql


# Grafana's variable formats, as its format registry writes them: the `formatRegistry` of
# grafana/scenes (packages/scenes/src/variables/interpolation/formatRegistry.ts), which is
# public/app/features/templating/formatRegistry.ts in Grafana releases before scenes. A
# value is a string (single-value variable) or a list of strings (multi-value variable).
VariableValue = str | Sequence[str]


def _each(value: VariableValue) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def format_singlequote(value: VariableValue) -> str:
    # SingleQuote: each value in '…' with `'` replaced by `\'`, joined by commas. Backslashes
    # are left as they are: unsafe in ClickHouse, where `\` escapes the next character.
    return ",".join("'" + v.replace("'", "\\'") + "'" for v in _each(value))


def format_sqlstring(value: VariableValue) -> str:
    # SQLString (sqlStringFormatter): each value in '…' with `'` doubled and `"` replaced by
    # `\"`, joined by commas; backslashes left as they are (unsafe in ClickHouse too).
    return ",".join("'" + v.replace("'", "''").replace('"', '\\"') + "'" for v in _each(value))


def _encode_uri_component_strict(text: str) -> str:
    # encodeURIComponentStrict: JavaScript's encodeURIComponent (UTF-8 bytes, upper-case hex,
    # leaving A-Z a-z 0-9 - _ . ! ~ * ' ( ) alone) and then `!'()*` encoded as well, which
    # leaves exactly what `quote` leaves with no safe characters.
    return quote(text, safe="")


def format_percentencode(value: VariableValue) -> str:
    # PercentEncode: a list is encoded as `{a,b}`, a single value as itself. The result holds
    # only A-Z a-z 0-9 - _ . ~ %: nothing in it can end a ClickHouse string literal.
    if isinstance(value, str):
        return _encode_uri_component_strict(value)
    return _encode_uri_component_strict("{" + ",".join(value) + "}")


def format_csv(value: VariableValue) -> str:
    # CSV: a list joined by commas, a single value as it is; no escaping.
    return ",".join(_each(value))


def format_pipe(value: VariableValue) -> str:
    # Pipe: a list joined by `|`, a single value as it is; no escaping.
    return "|".join(_each(value))


def format_raw(value: VariableValue) -> str:
    # Raw: `String(value)`, which joins a JavaScript array with commas; no escaping.
    return ",".join(_each(value))


FORMATS: dict[str, Callable[[VariableValue], str]] = {
    "singlequote": format_singlequote,
    "sqlstring": format_sqlstring,
    "percentencode": format_percentencode,
    "csv": format_csv,
    "pipe": format_pipe,
    "raw": format_raw,
}


def _plugin_format(values: Sequence[str]) -> str:
    # CHDatasource.format: an array becomes 'a','b' (unescaped), a single value stays raw.
    if len(values) == 1:
        return values[0]
    return "'" + "','".join(values) + "'"


_TEMPLATE_VAR = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)\]\]|\$(?!__)(\w+)")


def apply_template_variables(sql: str, ctx: QueryContext) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3) or match.group(4)
        fmt = match.group(2)
        values = ctx.values(name)
        if fmt is None:
            return _plugin_format(values)
        if fmt not in FORMATS:
            raise MacroError(
                f"variable format ${{{name}:{fmt}}} is not modelled here; "
                f"use one of {', '.join(FORMATS)}"
            )
        return FORMATS[fmt](values)

    return _TEMPLATE_VAR.sub(replace, sql)


def _epoch_s(moment: datetime) -> int:
    return int(moment.astimezone(UTC).timestamp())


def _epoch_ms(moment: datetime) -> int:
    return round(moment.astimezone(UTC).timestamp() * 1000)


_BACKEND_MACRO = re.compile(r"\$__(\w+)\b")


def apply_backend_macros(sql: str, ctx: QueryContext) -> str:
    interval_s = max(int(ctx.interval_s), 1)
    interval_ms = max(int(ctx.interval_s * 1000), 1)
    frm, to = ctx.time_from, ctx.time_to
    plain = {
        "fromTime": f"toDateTime({_epoch_s(frm)})",
        "toTime": f"toDateTime({_epoch_s(to)})",
        "fromTime_ms": f"fromUnixTimestamp64Milli({_epoch_ms(frm)})",
        "toTime_ms": f"fromUnixTimestamp64Milli({_epoch_ms(to)})",
        "interval_s": str(interval_s),
    }

    # The macros that take one column, each as the text it becomes for that column.
    from_date, to_date = f"{frm.astimezone(UTC):%Y-%m-%d}", f"{to.astimezone(UTC):%Y-%m-%d}"
    of_column: dict[str, Callable[[str], str]] = {
        "timeFilter": lambda col: f"{col} >= {plain['fromTime']} AND {col} <= {plain['toTime']}",
        "timeFilter_ms": lambda col: (
            f"{col} >= {plain['fromTime_ms']} AND {col} <= {plain['toTime_ms']}"
        ),
        "dateFilter": lambda col: (
            f"{col} >= toDate('{from_date}') AND {col} <= toDate('{to_date}')"
        ),
        "timeInterval": lambda col: (
            f"toStartOfInterval(toDateTime({col}), INTERVAL {interval_s} second)"
        ),
        "timeInterval_ms": lambda col: (
            f"toStartOfInterval(toDateTime64({col}, 3), INTERVAL {interval_ms} millisecond)"
        ),
    }

    out: list[str] = []
    pos = 0
    while (match := _BACKEND_MACRO.search(sql, pos)) is not None:
        name = match.group(1)
        out.append(sql[pos : match.start()])
        end = match.end()
        if name in plain:
            # A call with empty parentheses is the same value.
            if sql.startswith("()", end):
                end += 2
            out.append(plain[name])
            pos = end
            continue
        if end >= len(sql) or sql[end] != "(":
            raise MacroError(f"macro $__{name} needs arguments in parentheses")
        args, end = _macro_args(sql, end)
        if name not in of_column:
            raise MacroError(f"macro $__{name} is not one of the ClickHouse plugin's macros")
        if len(args) != 1:
            raise MacroError(f"$__{name} takes 1 argument, got {len(args)}: {args!r}")
        out.append(of_column[name](args[0].strip()))
        pos = end
    out.append(sql[pos:])
    return "".join(out)


def expand(sql: str, ctx: QueryContext) -> str:
    """The SQL ClickHouse receives for this panel refresh."""
    return apply_backend_macros(apply_template_variables(apply_conditional_all(sql, ctx), ctx), ctx)


def interval_for(ctx_from: datetime, ctx_to: datetime, max_data_points: int = 1000) -> float:
    """Grafana's panel interval for a range: range / max data points, at least 1 s."""
    span = (ctx_to - ctx_from).total_seconds()
    return max(1.0, math.ceil(span / max_data_points))
