"""Cost facts as the worker's hot path carries them: rows of values, in `CostFact`'s field
order (`v` first), with what each reader needs made from them when it asks.

A `CostFact` is a pydantic object whose fields live in a dict of their own; making one per
fact, reading it back into columns and writing it as JSON cost more than costing the sample.
Rows are plain lists: the store's insert takes their transpose, the observers read
`FactRecord`s (frozen structs with the fields as attributes, no dict each), and the facts
feed writes those as the JSON pydantic writes of the fact (tests/unit/test_fast_path.py
checks all three against the pydantic path's `CostFact`s).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import CostFact, assembler

FACT_FIELDS: tuple[str, ...] = tuple(CostFact.model_fields)
"""A fact row's values, in order: `CostFact`'s fields, `v` first."""
FACT_COLUMNS: tuple[str, ...] = FACT_FIELDS[1:]
"""The `cost_facts` columns in insert order (every field but `v`)."""
AT: dict[str, int] = {name: i for i, name in enumerate(FACT_FIELDS)}
"""Where each field sits in a row."""
_TS, _GPU = AT["ts"], AT["gpu_uuid"]

if TYPE_CHECKING:
    FactRecord = CostFact  # to the type checker: the same attributes, read the same way
else:
    FactRecord = msgspec.defstruct(
        "FactRecord",
        list(FACT_FIELDS),
        frozen=True,
        gc=False,  # no cycles: a flush's thousands of records stay out of the collector
        module=__name__,
    )
    """One fact as observers read it: `CostFact`'s fields as attributes, made from a row."""

_fact = assembler(CostFact)
_encoder = msgspec.json.Encoder()


def fact_of_row(row: Sequence[Any]) -> CostFact:
    """A row as a `CostFact` (its values were computed in range: nothing is validated)."""
    return _fact(dict(zip(FACT_FIELDS, row, strict=True)))


class FactBatch:
    """The facts of one flush, as rows (see the module's docstring)."""

    __slots__ = ("_records", "rows")

    def __init__(self, rows: Sequence[list[Any]]) -> None:
        self.rows = rows
        self._records: list[FactRecord] | None = None

    @classmethod
    def of(cls, facts: Iterable[CostFact]) -> FactBatch:
        """A batch of `CostFact`s (whose __dict__ holds their fields in order)."""
        return cls([list(fact.__dict__.values()) for fact in facts])

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self) -> dict[str, Sequence[Any]]:
        """The facts as the columns of a `cost_facts` insert, ts in epoch milliseconds."""
        if not self.rows:
            return {name: [] for name in FACT_COLUMNS}
        transposed = list(zip(*self.rows, strict=True))
        if len(transposed) != len(FACT_FIELDS):
            raise ValueError(f"a fact row has {len(transposed)} values, not {FACT_FIELDS}")
        named: dict[str, Sequence[Any]] = dict(zip(FACT_COLUMNS, transposed[1:], strict=True))
        named["ts"] = [to_ms(ts) for ts in named["ts"]]
        return named

    def records(self) -> list[FactRecord]:
        """The facts as `FactRecord`s (made once)."""
        if self._records is None:
            make: Any = FactRecord
            self._records = [make(*row) for row in self.rows]
        return self._records

    def without(self, samples: set[tuple[str, float]]) -> FactBatch:
        """The facts of every sample but these (GPU, ts)."""
        return FactBatch([row for row in self.rows if sample_of_row(row) not in samples])


def sample_of_row(row: Sequence[Any]) -> tuple[str, float]:
    """(GPU, ts) of a fact row: its sample's identity."""
    return row[_GPU], row[_TS]


def record_json(record: FactRecord) -> bytes:
    """A `FactRecord` as the JSON pydantic writes of its `CostFact`, but that an exponent is
    written `1e16` where pydantic writes `1e+16` (the same value)."""
    return _encoder.encode(record)
