"""Cancel and restate (ARCHITECTURE.md §3): which stored facts late metadata may change, and the
rows that correct them. Pure: the sink fetches and writes, this module decides.

A correction never updates a row: it writes the rows it replaces again with `sign = -1`
and their corrected versions with `sign = +1`, so that every sum of `value * sign` (the
views, the materialized rollups) is right with append-only inserts.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from gpuledger.ledger.factrows import MONEY_COLUMNS, VALUE_COLUMNS, Row


@dataclass(frozen=True)
class Scope:
    """Stored facts that a metadata change may alter.

    Any of the filters may be set; a fact is in scope when it matches all that are set.
    Over-selecting is harmless: a fact whose re-costed rows equal the stored ones is left.
    """

    gpu_uuids: frozenset[str] | None = None
    job_id: str | None = None
    job_ids: frozenset[str] | None = None
    node: str | None = None
    gpu_model: str | None = None
    provider: str | None = None
    region: str | None = None
    pricing_model: str | None = None
    t_from: float | None = None
    t_to: float | None = None
    price_only: bool = False
    """Only the facts' prices may change (a price entry, a node's description): who had
    the GPU, and every measure, stays; the store reprices such facts in one statement."""
    retag: tuple[tuple[str, str], ...] = ()
    """(column, value) of a job's tags that changed while what it held did not: the facts
    carrying `job_id` take these values, and nothing else of any fact moves; the store
    restates them in one statement."""

    def describe(self) -> str:
        parts = [
            f"{name}={sorted(value) if isinstance(value, frozenset) else value!r}"
            for name, value in vars(self).items()
            if value is not None and value is not False and value != ()
        ]
        return "Scope(" + ", ".join(parts) + ")"


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
    cancels, restates = list(live.elements()), list(wanted.elements())
    if same_rows(cancels, restates):
        return [], []
    return cancels, restates


# Money a set repricing scaled (ledger/reprice.py) differs from the cost model's product
# by a few units in the last place: such rows say the same, and are not restated again.
_MONEY_AT = tuple(VALUE_COLUMNS.index(c) for c in MONEY_COLUMNS)
_MONEY_REL = 1e-12


_without_money = operator.itemgetter(*(i for i in range(len(VALUE_COLUMNS)) if i not in _MONEY_AT))


def _order(row: Row) -> str:
    # repr: a row holds None beside numbers, which do not sort together.
    return repr(_without_money(row))


def same_rows(a: list[Row], b: list[Row]) -> bool:
    """True when the rows are the same but for float rounding of their money."""
    if len(a) != len(b):
        return False
    if len(a) > 1:
        a, b = sorted(a, key=_order), sorted(b, key=_order)
    for x, y in zip(a, b, strict=True):
        if _without_money(x) != _without_money(y):
            return False
        for i in _MONEY_AT:
            u, v = x[i], y[i]
            if not (isinstance(u, float) and isinstance(v, float)):
                return False
            if not math.isclose(u, v, rel_tol=_MONEY_REL, abs_tol=0.0):
                return False
    return True


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
        for entry in sorted(map(repr, history)):
            digest.update(entry.encode() + b"\x00")
    return "correction:" + digest.hexdigest()
