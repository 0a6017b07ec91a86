"""Repricing as a set operation: what a price entry or a node's description changes in the
facts it governs, decided once per span of time instead of once per fact. Pure: the store
applies the spans to every fact they cover (streams/sql.py `reprice`).

A price or a node changes what a GPU-second costs, never who had the GPU: a fact's share,
duration, measures and job stay, and only its pricing columns (`provider`, `region`,
`pricing_model`, `usd_per_gpu_hour`, `price_missing`) and its money move. The pricing of a
fact depends on its node, its model and its MIG profile (as stored) and its time; for each
such key the answer is constant between the times a node description or a price entry takes
over, so a key's facts over a scope are priced by a handful of `PriceSpan`s.

Where a span cannot say what re-costing the sample would, its facts go back to the samples
(`PriceSpan.exact` false, and the rules in streams/sql.py `reprice`):

- a stored model name that may be an unmatched product name (no pattern of the catalog
  matches it, yet a model carries that name): a product name is priced only by a node's
  own price, a model by the price book;
- a fact whose millisecond is a span's first: its sample's time may lie up to half a
  millisecond before it, on the other side of the change;
- a fact stored without a price (rate 0) that now has one, where its sample had several
  rows: its money was 0 and says nothing of its share, which is stored as Float32.

Every other fact's money scales by the ratio of the new rate to the old one, which is the
cost model's product to within a few units in the last place (`restate.same_rows` treats
such rows as equal, so a later re-costing does not restate them again); a fact without a
price before, its sample's only row (the whole GPU), is priced from the raw sample's interval
and utilization by the cost model's own arithmetic, to the last bit.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from gpuledger.ledger.cost import gpu_rate, node_place
from gpuledger.ledger.prices import PRICING_VALUE
from gpuledger.ledger.restate import Scope
from gpuledger.ledger.state import MetadataState
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.pricebook import WILDCARD

# The first span of a key governs every fact before the next one.
SINCE_START_MS = -(2**62)
DAY_S = 86_400
# Stored rows one repricing statement reads at most: it writes about twice as many (a cancel
# and a restated row each), which the store keeps as one insert block, so that a failure
# never leaves a cancel without its restated row.
CHUNK_ROWS = 400_000


@dataclass(frozen=True)
class PriceKey:
    """What a fact's pricing depends on besides its time, as `cost_facts` stores it."""

    node: str
    gpu_model: str
    mig_profile: str


@dataclass(frozen=True)
class PriceSpan:
    """The pricing of a key's facts from `since_ms` until the key's next span."""

    key: PriceKey
    since_ms: int
    provider: str
    region: str
    pricing_model: str
    usd_per_gpu_hour: float
    price_missing: int
    exact: bool = True

    def as_tuple(self) -> tuple[str, str, str, int, str, str, str, float, int, int]:
        """The span as one element of the store's `spans` parameter (streams/sql.py)."""
        k = self.key
        return (
            k.node,
            k.gpu_model,
            k.mig_profile,
            self.since_ms,
            self.provider,
            self.region,
            self.pricing_model,
            self.usd_per_gpu_hour,
            self.price_missing,
            int(self.exact),
        )


def price_spans(
    keys: Iterable[PriceKey],
    state: MetadataState,
    t_from: float | None = None,
    t_to: float | None = None,
) -> list[PriceSpan]:
    """The spans pricing each key's facts in [t_from, t_to) as `cost_sample` prices them."""
    out: list[PriceSpan] = []
    for key in dict.fromkeys(keys):
        out += _key_spans(key, state, t_from, t_to)
    return out


def _key_spans(
    key: PriceKey, state: MetadataState, t_from: float | None, t_to: float | None
) -> list[PriceSpan]:
    catalog = state.catalog
    gpu_model: str | None = key.gpu_model
    if key.gpu_model not in catalog.models:
        gpu_model = None  # an unmatched product name, kept as the fact's model
    elif catalog.model_for(key.gpu_model) is None:
        # A model's name, or a product name that happens to be one: only the sample knows.
        return [PriceSpan(key, SINCE_START_MS, WILDCARD, WILDCARD, "", 0.0, 0, exact=False)]
    end = math.inf if t_to is None else t_to
    t = -math.inf if t_from is None else t_from
    spans: list[PriceSpan] = []
    while t < end:
        node, node_until = state.node_span(key.node, t)
        provider, region, pricing = node_place(node)
        entry, price_until = None, math.inf
        if (node is None or node.usd_per_gpu_hour is None) and gpu_model is not None:
            entry, _, price_until = state.prices.lookup_span(
                provider, region, gpu_model, pricing, t
            )
        rate, missing = gpu_rate(key.mig_profile, node, entry, gpu_model, catalog)
        since = SINCE_START_MS if math.isinf(t) else to_ms(t)
        spans.append(PriceSpan(key, since, provider, region, PRICING_VALUE[pricing], rate, missing))
        t = min(node_until, price_until)
    return spans


@dataclass(frozen=True)
class RepriceChunk:
    """The facts one repricing statement covers: some GPUs' facts of a scope in one UTC day
    (one partition of the facts)."""

    scope: Scope
    gpus: tuple[str, ...]
    keys: frozenset[PriceKey]
    rows: int


def reprice_chunks(
    scope: Scope, plan: Iterable[tuple[int, str, PriceKey, int]], max_rows: int = CHUNK_ROWS
) -> list[RepriceChunk]:
    """The plan's (day, GPU, key, stored rows) cut into statements of at most `max_rows`
    stored rows (a GPU with more in a day gets a statement of its own)."""
    by_day: dict[int, dict[str, tuple[int, set[PriceKey]]]] = defaultdict(dict)
    for day, gpu, key, rows in plan:
        held, seen = by_day[day].get(gpu, (0, set()))
        by_day[day][gpu] = (held + rows, seen | {key})
    chunks: list[RepriceChunk] = []
    for day in sorted(by_day):
        part = _day_scope(scope, day)
        gpus: list[str] = []
        keys: set[PriceKey] = set()
        rows = 0
        for gpu, (n, gpu_keys) in sorted(by_day[day].items()):
            if gpus and rows + n > max_rows:
                chunks.append(RepriceChunk(part, tuple(gpus), frozenset(keys), rows))
                gpus, keys, rows = [], set(), 0
            gpus.append(gpu)
            keys |= gpu_keys
            rows += n
        if gpus:
            chunks.append(RepriceChunk(part, tuple(gpus), frozenset(keys), rows))
    return chunks


def _day_scope(scope: Scope, day: int) -> Scope:
    start, end = day * DAY_S, (day + 1) * DAY_S
    return replace(
        scope,
        t_from=start if scope.t_from is None else max(scope.t_from, start),
        t_to=end if scope.t_to is None else min(scope.t_to, end),
    )


def reprice_token(chunk: RepriceChunk, spans: Sequence[PriceSpan], stored_rows: int) -> str:
    """The dedup token of a chunk's repricing: the statement and the stored rows it read.

    Facts are append-only, so the count of a chunk's stored rows (`stored_rows`, read just
    before) only grows: the same repricing decided twice from the same rows (retried after
    a timeout) is stored once, and one decided after more rows came (a price changed back)
    gets a new token.
    """
    return _chunk_token("reprice", chunk, stored_rows, [span.as_tuple() for span in spans])


def retag_token(chunk: RepriceChunk, stored_rows: int) -> str:
    """The dedup token of a chunk's retagging (`Scope.retag`), as `reprice_token`'s."""
    return _chunk_token("retag", chunk, stored_rows, [])


def _chunk_token(kind: str, chunk: RepriceChunk, stored_rows: int, details: list[tuple]) -> str:
    digest = hashlib.sha256(kind.encode())
    digest.update(chunk.scope.describe().encode())
    for gpu in chunk.gpus:
        digest.update(gpu.encode() + b"\x00")
    digest.update(str(stored_rows).encode())
    for detail in details:
        digest.update(repr(detail).encode() + b"\x00")
    return f"{kind}:{digest.hexdigest()}"
