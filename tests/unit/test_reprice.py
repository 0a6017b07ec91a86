"""Repricing by spans must price a fact as costing its sample does: every span that the store
applies (exact, and not at the fact's own millisecond of a change) gives the pricing columns
of the fact that `cost_all` makes of the sample, to the last bit; and the chunks of a plan
cover it once."""

from __future__ import annotations

import bisect
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuledger.ledger.factrows import VALUE_COLUMNS
from gpuledger.ledger.reprice import (
    SINCE_START_MS,
    PriceKey,
    PriceSpan,
    price_spans,
    reprice_chunks,
    reprice_token,
)
from gpuledger.ledger.restate import Scope, correction, same_rows
from gpuledger.ledger.state import MetadataState
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import GpuSample
from gpuledger.schema.pricebook import GpuModelCatalog, GpuModelPattern
from tests.unit.test_fast_path import T0, metadata, sample, state_of

PRICING = ("provider", "region", "pricing_model", "usd_per_gpu_hour", "price_missing")


def span_at(spans: list[PriceSpan], key: PriceKey, ts_ms: int) -> PriceSpan | None:
    """The span the store's ASOF join picks: the key's last one starting at or before ts."""
    mine = sorted((s for s in spans if s.key == key), key=lambda s: s.since_ms)
    at = bisect.bisect_right([s.since_ms for s in mine], ts_ms)
    return mine[at - 1] if at else None


def applies(span: PriceSpan, ts_ms: int) -> bool:
    """What the store reprices itself (streams/sql.py `_repriced`), rate 0 aside."""
    return span.exact and not (ts_ms == span.since_ms and span.since_ms != SINCE_START_MS)


@settings(max_examples=300, deadline=None)
@given(
    messages=metadata,
    samples=st.lists(sample, min_size=1, max_size=8),
    window=st.tuples(st.none() | st.floats(T0, T0 + 600), st.none() | st.floats(T0, T0 + 600)),
    sub_ms=st.sampled_from([0.0, 0.0004, -0.0004, 0.0006]),
)
def test_a_span_prices_a_fact_as_costing_its_sample_does(
    messages: list[Any],
    samples: list[dict[str, Any]],
    window: tuple[float | None, float | None],
    sub_ms: float,
) -> None:
    state = state_of(messages)
    t_from, t_to = window
    changes = [m.effective_from for m in state.prices] + [n.ts for n in state.nodes()]
    for raw in samples:
        one = GpuSample.model_validate(raw)
        if changes:  # a sample at a change, or just off it, is where spans could slip
            one = one.model_copy(update={"ts": changes[len(samples) % len(changes)] + sub_ms})
        ts_ms = to_ms(one.ts)
        if (t_from is not None and ts_ms < to_ms(t_from)) or (
            t_to is not None and ts_ms >= to_ms(t_to)
        ):
            continue  # outside the scope: no span is asked for it
        for fact in state.cost_all([one]):
            key = PriceKey(fact.node, fact.gpu_model, fact.mig_profile)
            spans = price_spans([key], state, t_from, t_to)
            span = span_at(spans, key, ts_ms)
            assert span is not None, (key, ts_ms, spans)
            if not applies(span, ts_ms):
                continue
            got = dict(zip(PRICING, span.as_tuple()[4:9], strict=True))
            want = {name: getattr(fact, name) for name in PRICING}
            assert got == want, (one, span)


def test_a_fact_at_a_change_is_left_to_its_sample() -> None:
    """The sample at a price change's millisecond may lie half a millisecond either side."""
    key = PriceKey("n1", "H100", "")
    spans = [
        PriceSpan(key, SINCE_START_MS, "*", "*", "on_demand", 4.0, 0),
        PriceSpan(key, 1_000, "*", "*", "on_demand", 6.0, 0),
    ]
    assert applies(span_at(spans, key, 999) or spans[0], 999)
    assert not applies(span_at(spans, key, 1_000) or spans[0], 1_000)
    assert applies(span_at(spans, key, 1_001) or spans[0], 1_001)


def test_a_model_name_that_may_be_a_product_name_is_left_to_its_samples() -> None:
    state = state_of([])
    # "H100" is a model's name, and the catalog matches it to H100: a model.
    (model,) = price_spans([PriceKey("n1", "H100", "")], state)
    assert model.exact and model.price_missing == 1
    # A product no pattern matches is priced by its node alone: missing without one.
    (product,) = price_spans([PriceKey("n1", "Mystery GPU", "")], state)
    assert product.exact and product.price_missing == 1
    # A catalog whose patterns miss a model's own name: a fact stored with that name may be
    # that model's or an unmatched product's of the same name; only the sample can tell.
    hopper = GpuModelCatalog([GpuModelPattern(re.compile("Hopper"), "H100", 7)])
    (either,) = price_spans([PriceKey("n1", "H100", "")], MetadataState(hopper))
    assert not either.exact


plan_rows = st.lists(
    st.tuples(
        st.integers(20_000, 20_003),
        st.sampled_from([f"GPU-{i}" for i in range(6)]),
        st.sampled_from([PriceKey("n1", "H100", ""), PriceKey("n2", "H100", "3g.40gb")]),
        st.integers(1, 300),
    ),
    max_size=40,
)


@given(plan=plan_rows, limit=st.integers(1, 500))
def test_chunks_cover_the_plan_once_a_day_at_a_time(
    plan: list[tuple[int, str, PriceKey, int]], limit: int
) -> None:
    scope = Scope(gpu_model="H100", t_from=20_000 * 86_400 + 3_600.5, price_only=True)
    chunks = reprice_chunks(scope, plan, max_rows=limit)
    want: dict[tuple[int, str], int] = {}
    for day, gpu, _, rows in plan:
        want[(day, gpu)] = want.get((day, gpu), 0) + rows
    got: dict[tuple[int, str], int] = {}
    for chunk in chunks:
        assert chunk.scope.t_from is not None and chunk.scope.t_to is not None
        day = int(chunk.scope.t_from // 86_400)
        assert chunk.scope.t_to <= (day + 1) * 86_400  # one partition
        assert chunk.scope.t_from >= (scope.t_from or 0)
        assert len(chunk.gpus) == 1 or chunk.rows <= limit
        for gpu in chunk.gpus:
            assert (day, gpu) not in got
            got[(day, gpu)] = want[(day, gpu)]
        assert chunk.rows == sum(want[(day, g)] for g in chunk.gpus)
    assert got == want


def test_a_token_names_the_rows_it_was_decided_from() -> None:
    scope = Scope(node="n1", price_only=True)
    key = PriceKey("n1", "H100", "")
    plan = [(20_000, "GPU-0", key, 10)]
    spans = [PriceSpan(key, SINCE_START_MS, "*", "*", "on_demand", 4.0, 0)]
    (chunk,) = reprice_chunks(scope, plan)
    assert reprice_token(chunk, spans, 10) == reprice_token(chunk, list(spans), 10)
    assert reprice_token(chunk, spans, 10) != reprice_token(chunk, spans, 12)
    other = [PriceSpan(key, SINCE_START_MS, "*", "*", "on_demand", 5.0, 0)]
    assert reprice_token(chunk, spans, 10) != reprice_token(chunk, other, 10)


def test_rows_that_differ_only_by_rounding_of_their_money_are_not_restated() -> None:
    row: list[Any] = [0] * len(VALUE_COLUMNS)
    at = {name: i for i, name in enumerate(VALUE_COLUMNS)}
    row[at["cost_usd"]] = 0.1
    row[at["idle_cost_usd"]] = 0.05
    row[at["usd_per_gpu_hour"]] = 360.0
    scaled = list(row)
    scaled[at["cost_usd"]] = 0.1 * (7.0 / 3.0) * (3.0 / 7.0)  # a few ulps off
    other = list(row)
    other[at["cost_usd"]] = 0.1000001
    assert same_rows([tuple(row)], [tuple(scaled)])
    assert not same_rows([tuple(row)], [tuple(other)])
    from collections import Counter

    assert correction(Counter([tuple(row)]), [tuple(scaled)]) == ([], [])
    assert correction(Counter([tuple(row)]), [tuple(other)]) == ([tuple(row)], [tuple(other)])
