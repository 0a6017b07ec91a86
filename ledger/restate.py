"""Cancel and restate (ARCHITECTURE.md §3): which stored facts late metadata may change, and the
rows that correct them. Pure: the sink fetches and writes, this module decides.

A correction never updates a row: it writes the rows it replaces again with `sign = -1`
and their corrected versions with `sign = +1`, so that every sum of `value * sign` (the
views, the materialized rollups) is right with append-only inserts.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import CostFact

# The cost_facts columns in insert order (ARCHITECTURE.md §4); `sign` is set per row.
FACT_COLUMNS: tuple[str, ...] = tuple(name for name in CostFact.model_fields if name != "v")
_FLOAT32 = frozenset({"duration_s", "share", "util_sm", "power_w"})
_VALUE_COLUMNS = tuple(c for c in FACT_COLUMNS if c != "sign")

Row = tuple[object, ...]  # one fact in FACT_COLUMNS order without `sign`; ts in epoch ms


@dataclass(frozen=True)
class Scope:
    """Stored facts that a metadata change may alter.

    Any of the filters may be set; a fact is in scope when it matches all that are set.
    Over-selecting is harmless: a fact whose re-costed rows equal the stored ones is left.
    """

    gpu_uuids: frozenset[str] | None = None
    job_id: str | None = None
    node: str | None = None
    gpu_model: str | None = None
    provider: str | None = None
    region: str | None = None
    pricing_model: str | None = None
    t_from: float | None = None
    t_to: float | None = None

    def describe(self) -> str:
        parts = [f"{name}={value!r}" for name, value in vars(self).items() if value is not None]
        return "Scope(" + ", ".join(parts) + ")"


def _f32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


def fact_row(fact: CostFact) -> Row:
    """A fact as the store will give it back: ts in ms, Float32 columns rounded."""
    out: list[object] = []
    for name in _VALUE_COLUMNS:
        value = getattr(fact, name)
        if name == "ts":
            value = to_ms(value)
        elif name in _FLOAT32 and value is not None:
            value = _f32(value)
        out.append(value)
    return tuple(out)


def stored_row(values: Iterable[object]) -> tuple[int, Row]:
    """Split a row read back as (sign, *value columns) into its sign and values."""
    sign, *rest = values
    normal: list[object] = []
    for name, value in zip(_VALUE_COLUMNS, rest, strict=True):
        if name in _FLOAT32 and isinstance(value, float) and not math.isnan(value):
            value = _f32(value)
        normal.append(value)
    return int(sign), tuple(normal)  # type: ignore[call-overload]


def live_rows(stored: Iterable[tuple[int, Row]]) -> Counter[Row]:
    """The rows in force: every +1 row not cancelled by an identical -1 row."""
    live: Counter[Row] = Counter()
    for sign, row in stored:
        live[row] += sign
    return +live  # drop rows whose count fell to zero


def correction(live: Counter[Row], recosted: Iterable[Row]) -> tuple[list[Row], list[Row]]:
    """(rows to cancel, rows to restate) turning `live` into `recosted`; empty when equal."""
    wanted = Counter(recosted)
    if wanted == live:
        return [], []
    return list(live.elements()), list(wanted.elements())


def correction_token(histories: Iterable[tuple[str, Iterable[tuple[int, Row]]]]) -> str:
    """The dedup token of a correction: a digest of the stored rows it was decided from.

    Facts are append-only, so a GPU's stored history only grows: the same history is never
    corrected twice. A correction retried after a timeout, or decided twice from the same
    read (a worker that took a partition over while the old owner's insert was in flight),
    carries the same token and is stored once; a later correction of the same rows (A -> B
    -> A) reads a longer history and gets a new token.
    """
    digest = hashlib.sha256(b"correction")
    for gpu_uuid, history in sorted(histories, key=lambda h: h[0]):
        digest.update(gpu_uuid.encode() + b"\x00")
        for sign, row in sorted(history, key=repr):
            digest.update(repr((sign, row)).encode() + b"\x00")
    return "correction:" + digest.hexdigest()


def row_as_fact_values(row: Row, sign: int) -> list[object]:
    """A row in FACT_COLUMNS order, ready for the columnar insert."""
    values = list(row)
    values.insert(FACT_COLUMNS.index("sign"), sign)
    return values
