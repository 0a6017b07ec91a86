"""How a cost fact is laid out as a `cost_facts` row (ARCHITECTURE.md §4), in one place: the
columns in insert order, a fact as the columns of an insert, and a fact as the store gives
it back (the form corrections compare).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from gpuledger.ledger.facts import FACT_COLUMNS
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import CostFact

# The columns that say what a row is (all but `sign`), as a correction compares them.
VALUE_COLUMNS: tuple[str, ...] = tuple(c for c in FACT_COLUMNS if c != "sign")
_FLOAT32 = frozenset({"duration_s", "share", "util_sm", "power_w", "sm_active"})
# The columns in dollars (Float64).
MONEY_COLUMNS = ("usd_per_gpu_hour", "cost_usd", "idle_cost_usd")
_SIGN_AT = FACT_COLUMNS.index("sign")

Row = tuple[object, ...]  # one fact in VALUE_COLUMNS order; ts in epoch ms

# The Arrow type of each column, the table's own: the store converts nothing, and Float32
# values are rounded here as clickhouse-connect's Native writer rounds them (C's cast).
_ARROW_TYPES: dict[str, pa.DataType] = {
    "ts": pa.timestamp("ms", tz="UTC"),
    "sign": pa.int8(),
    "mem_used_bytes": pa.uint64(),
    **dict.fromkeys(_FLOAT32, pa.float32()),
    **dict.fromkeys(MONEY_COLUMNS, pa.float64()),
    **dict.fromkeys(("allocated", "idle", "price_missing"), pa.uint8()),
}
FACT_SCHEMA = pa.schema([(c, _ARROW_TYPES.get(c, pa.string())) for c in FACT_COLUMNS])
"""`cost_facts` as Arrow (strings where the table has String or LowCardinality(String))."""


def fact_table(columns: Mapping[str, Sequence[Any]]) -> pa.Table:
    """The columns of an insert (`FactBatch.columns`, `row_columns`) as an Arrow table: written
    by Arrow's C++ rather than clickhouse-connect's Python, at about a third of the cost."""
    return pa.Table.from_arrays(
        [pa.array(columns[f.name], f.type) for f in FACT_SCHEMA], schema=FACT_SCHEMA
    )


def row_columns(signed: Iterable[tuple[int, Row]]) -> dict[str, list[Any]]:
    """(sign, row) pairs as the columns of a `cost_facts` insert."""
    rows = []
    for sign, row in signed:
        values = list(row)
        values.insert(_SIGN_AT, sign)
        rows.append(values)
    return {name: [row[i] for row in rows] for i, name in enumerate(FACT_COLUMNS)}


def _f32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


def fact_row(fact: CostFact) -> Row:
    """A fact as the store will give it back: ts in ms, Float32 columns rounded."""
    out: list[object] = []
    for name in VALUE_COLUMNS:
        value = getattr(fact, name)
        if name == "ts":
            value = to_ms(value)
        elif name in _FLOAT32 and value is not None:
            value = _f32(value)
        out.append(value)
    return tuple(out)


def stored_row(values: Iterable[object]) -> tuple[int, Row]:
    """Split a row read back as (sign, *VALUE_COLUMNS) into its sign and values."""
    sign, *rest = values
    normal: list[object] = []
    for name, value in zip(VALUE_COLUMNS, rest, strict=True):
        if name in _FLOAT32 and isinstance(value, float) and not math.isnan(value):
            value = _f32(value)
        normal.append(value)
    return int(sign), tuple(normal)  # type: ignore[call-overload]
