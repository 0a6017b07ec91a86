"""Speed must not change a dollar: the worker's fast path (msgspec decoding, facts built
without re-validation, the cost model's memos, the price index's remembered spans) gives
exactly the facts of the pydantic path, to the last bit of every float."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuledger.ledger import cost
from gpuledger.ledger.factrows import VALUE_COLUMNS
from gpuledger.ledger.facts import (
    FACT_COLUMNS,
    FACT_FIELDS,
    FactBatch,
    fact_of_row,
    record_json,
    sample_of_row,
)
from gpuledger.ledger.prices import PriceIndex
from gpuledger.ledger.state import MetadataState
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import (
    CostFact,
    GpuSample,
    JobEvent,
    JobState,
    NodeInfo,
    PriceEntry,
    PricingModel,
)
from gpuledger.schema.pricebook import load_gpu_models
from gpuledger.streams.decode import SampleDecoder

CATALOG = load_gpu_models()
T0 = 1_750_000_000.0
GiB = 1024**3
GPUS = ["GPU-a", "GPU-b", "GPU-c"]
NODES = ["n1", "n2"]
JOBS = ["j1", "j2", "j3"]
PRODUCTS = ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "Mystery GPU"]
DECODER = SampleDecoder()


def forget_memos() -> None:
    cost._row_templates.clear()
    cost._label_jobs.clear()
    cost._whole_shares.clear()


def reference_facts(state: MetadataState, samples: list[GpuSample]) -> list[CostFact]:
    """The facts with no memo at all: each sample costed as if it were the first."""
    facts: list[CostFact] = []
    for one in samples:
        forget_memos()
        facts += state.cost_all([one])
    return facts


def as_json(facts: list[CostFact]) -> list[str]:
    return [f.model_dump_json() for f in facts]


times = st.floats(T0, T0 + 600.0)
util = st.none() | st.floats(0.0, 1.0) | st.sampled_from([0.0, 0.01, 0.05, 1.0])
labels = st.fixed_dictionaries(
    {},
    optional={
        "job_id": st.none() | st.sampled_from(JOBS),
        "team": st.none() | st.sampled_from(["t1", "t2"]),
        "job_type": st.none() | st.sampled_from(["training", "inference"]),
    },
)
process = st.fixed_dictionaries(
    {"pid": st.integers(1, 1000)},
    optional={
        "util_sm": util,
        "mem_used_bytes": st.integers(0, 80 * GiB),
        "labels": labels,
    },
)
sample = st.fixed_dictionaries(
    {
        "ts": times,
        "node": st.sampled_from(NODES),
        "gpu_uuid": st.sampled_from(GPUS),
        "gpu_name": st.sampled_from(PRODUCTS),
    },
    optional={
        "mig_profile": st.none() | st.sampled_from(["1g.10gb", "3g.40gb"]),
        "interval_s": st.sampled_from([1.0, 0.5, 30.0]),
        "util_sm": util,
        "mem_used_bytes": st.integers(0, 80 * GiB),
        "power_w": st.none() | st.floats(0.0, 1000.0),
        "processes": st.lists(process, max_size=3),
    },
)
job_event = st.builds(
    JobEvent,
    ts=times,
    job_id=st.sampled_from(JOBS),
    state=st.none() | st.sampled_from(["running", "succeeded", "failed"]),
    team=st.none() | st.sampled_from(["t1", "t2"]),
    job_type=st.none() | st.sampled_from(["training", "notebook"]),
    gpu_uuids=st.none() | st.lists(st.sampled_from(GPUS), unique=True),
    started_at=st.none() | times,
    ended_at=st.none() | times,
)
price = st.builds(
    PriceEntry,
    provider=st.sampled_from(["*", "aws"]),
    region=st.sampled_from(["*", "us-east-1"]),
    gpu_model=st.sampled_from(["H100", "A100-80GB", "L4"]),
    pricing_model=st.sampled_from(PricingModel),
    usd_per_gpu_hour=st.floats(0.0, 50.0),
    effective_from=st.sampled_from([0.0]) | times,
).filter(lambda e: e.provider != "*" or e.region == "*")
node_info = st.builds(
    NodeInfo,
    ts=times,
    node=st.sampled_from(NODES),
    provider=st.sampled_from(["*", "aws"]),
    region=st.sampled_from(["*", "us-east-1"]),
    pricing_model=st.sampled_from(PricingModel),
    usd_per_gpu_hour=st.none() | st.floats(0.0, 50.0),
)
metadata = st.lists(job_event | price | node_info, max_size=12)


def state_of(messages: list[Any]) -> MetadataState:
    state = MetadataState(CATALOG)
    for message in messages:
        if isinstance(message, JobEvent):
            state.apply_job(message)
        elif isinstance(message, PriceEntry):
            state.apply_price(message)
        else:
            state.apply_node(message)
    return state


def batch(samples: list[dict[str, Any]]) -> bytes:
    return json.dumps({"v": 1, "node": "n1", "samples": samples}).encode()


def pydantic_samples(value: bytes) -> list[GpuSample]:
    return [GpuSample.model_validate(s) for s in orjson.loads(value)["samples"]]


@settings(max_examples=300, deadline=None)
@given(metadata, st.lists(sample, max_size=16))
def test_the_fast_path_and_the_pydantic_path_give_identical_facts(
    messages: list[Any], samples: list[dict[str, Any]]
) -> None:
    state = state_of(messages)
    value = batch(samples)
    fast = DECODER.decode(value)
    assert fast is not None
    fast_facts = state.cost_all(fast)  # memos warm from earlier examples and samples
    slow_facts = reference_facts(state, pydantic_samples(value))
    assert as_json(fast_facts) == as_json(slow_facts)
    for fact in fast_facts:
        # Built without validation, yet exactly what validation makes of its values.
        assert CostFact.model_validate_json(fact.model_dump_json()).model_dump_json() == (
            fact.model_dump_json()
        )
        assert CostFact.model_validate(fact.model_dump()) == fact


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(metadata, st.lists(sample, max_size=4)), min_size=1, max_size=5))
def test_memos_never_outlive_the_metadata_they_were_made_from(
    steps: list[tuple[list[Any], list[dict[str, Any]]]],
) -> None:
    """A fleet's life: metadata changes between samples of the same GPUs; each sample costs
    what a worker with no memory of earlier samples would make of it."""
    warm = MetadataState(CATALOG)
    applied: list[Any] = []
    for messages, samples in steps:
        applied += messages
        for message in messages:
            state_of_one(warm, message)
        for raw in samples:
            (fast,) = DECODER.decode(batch([raw])) or []
            with_memos = warm.cost_all([fast])
            fresh = reference_facts(state_of(applied), pydantic_samples(batch([raw])))
            assert as_json(with_memos) == as_json(fresh)


def state_of_one(state: MetadataState, message: Any) -> None:
    if isinstance(message, JobEvent):
        state.apply_job(message)
    elif isinstance(message, PriceEntry):
        state.apply_price(message)
    else:
        state.apply_node(message)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "ask"]), price, times, st.sampled_from(["aws", "*"])),
        max_size=30,
    )
)
def test_a_remembered_price_span_answers_what_a_fresh_lookup_answers(
    steps: list[tuple[str, PriceEntry, float, str]],
) -> None:
    index = PriceIndex()
    entries: list[PriceEntry] = []
    for action, entry, t, provider in steps:
        if action == "add":
            index.add(entry)
            entries.append(entry)
            continue
        for model in ("H100", "L4"):
            for pricing in PricingModel:
                fresh = PriceIndex(entries).lookup(provider, "us-east-1", model, pricing, t)
                assert index.lookup(provider, "us-east-1", model, pricing, t) == fresh


@settings(max_examples=300, deadline=None)
@given(metadata, st.lists(sample, max_size=16))
def test_the_workers_rows_are_the_facts_columns_records_and_feed(
    messages: list[Any], samples: list[dict[str, Any]]
) -> None:
    """The worker carries facts as rows (ledger/facts.py): their insert columns, the records
    observers read and the JSON the facts topic gets are those of the pydantic path's facts."""
    state = state_of(messages)
    value = batch(samples)
    facts = reference_facts(state, pydantic_samples(value))
    rows = FactBatch(state.cost_rows(DECODER.decode(value) or []))
    assert len(rows) == len(facts)
    columns = rows.columns()
    assert list(columns) == list(FACT_COLUMNS)
    for i, fact in enumerate(facts):
        assert list(fact.__dict__) == list(FACT_FIELDS)
        assert tuple(columns[name][i] for name in VALUE_COLUMNS) == fact_row_unrounded(fact)
        assert columns["sign"][i] == fact.sign == 1
        record = rows.records()[i]
        assert {name: getattr(record, name) for name in FACT_FIELDS} == fact.__dict__
        published = record_json(record)  # what facts_feed.send_facts sends
        assert CostFact.model_validate_json(published) == fact
        assert json.loads(published) == json.loads(fact.model_dump_json())
        # The same bytes, but that an exponent is written 1e16 where pydantic writes 1e+16.
        assert published == fact.model_dump_json().encode().replace(b"e+", b"e")
        assert not any(isinstance(v, float) and math.isnan(v) for v in fact.__dict__.values())
    assert [fact_of_row(row) for row in rows.rows] == facts
    assert FactBatch.of(facts).rows == rows.rows
    assert [sample_of_row(row) for row in rows.rows] == [(f.gpu_uuid, f.ts) for f in facts]


def fact_row_unrounded(fact: CostFact) -> tuple[object, ...]:
    """A fact's values in column order, ts in ms (the insert's form, Float32 not rounded)."""
    return tuple(to_ms(fact.ts) if n == "ts" else getattr(fact, n) for n in VALUE_COLUMNS)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "discard", "forget_before"]),
            st.integers(0, 40) | st.integers(1_750_000_000_000, 1_750_000_000_040),
        ),
        max_size=60,
    ),
    st.integers(0, 40) | st.integers(1_750_000_000_000, 1_750_000_000_040),
)
def test_a_gpus_compact_sample_memory_answers_as_a_set_would(
    steps: list[tuple[str, int]], probe: int
) -> None:
    from gpuledger.ledger.joiner import Stamps

    stamps, reference = Stamps(), set()
    for action, ts_ms in steps:
        if action == "add":
            assert stamps.add(ts_ms) == (ts_ms not in reference)
            reference.add(ts_ms)
        elif action == "discard":
            stamps.discard(ts_ms)
            reference.discard(ts_ms)
        else:
            stamps.forget_before(ts_ms)
            reference = {t for t in reference if t >= ts_ms}
        assert list(stamps.times) == sorted(reference)
    assert (probe in stamps) == (probe in reference)
    assert len(stamps) == len(reference)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["offer", "offer", "due", "flush"]),
            st.lists(st.tuples(st.sampled_from(GPUS), st.integers(0, 30)), max_size=4),
            st.floats(0.0, 2.0),  # wall time passing
        ),
        max_size=40,
    )
)
def test_the_joiner_releases_what_a_pass_over_every_held_sample_releases(
    steps: list[tuple[str, list[tuple[str, int]], float]],
) -> None:
    """The joiner finds due samples through a heap and a queue; a plain pass over all of
    them (what it did before) must release the same samples, in the same order."""
    from gpuledger.ledger.joiner import Joiner

    joiner = Joiner(grace_s=1.0, max_hold_wall_s=3.0)
    reference: list[tuple[int, GpuSample, float]] = []  # (arrival, sample, arrived_wall)
    watermark, wall, arrival = 0.0, 0.0, 0
    for offset, (action, pairs, elapsed) in enumerate(steps):
        wall += elapsed
        if action == "offer":
            samples = [
                GpuSample(ts=T0 + t, node="n1", gpu_uuid=g, gpu_name="x", interval_s=1.0)
                for g, t in pairs
            ]
            dropped = {id(s) for s in joiner.offer(samples, 0, offset, wall)}
            for sample in samples:
                if id(sample) not in dropped:
                    arrival += 1
                    reference.append((arrival, sample, wall))
                    watermark = max(watermark, sample.ts + sample.interval_s)
            continue
        flush_all = action == "flush"
        released = joiner.due(wall, flush_all=flush_all)
        expected = [
            r
            for r in reference
            if flush_all or r[1].ts + r[1].interval_s <= watermark - 1.0 or wall - r[2] >= 3.0
        ]
        reference = [r for r in reference if r not in expected]
        assert [h.sample for h in released] == [r[1] for r in expected]
        assert joiner.held_count == len(reference)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["event", "event", "ask"]), job_event, times, st.booleans()),
        max_size=40,
    )
)
def test_the_index_of_a_gpus_jobs_finds_the_holder_asking_every_job_would_find(
    steps: list[tuple[str, JobEvent, float, bool]],
) -> None:
    """MetadataState finds who holds a GPU by bisecting its jobs' starts; asking every job
    the GPU ever had (allocate's own rule) must give the same job, whatever changed since."""
    from gpuledger.ledger.cost import _explicit_holder

    state = MetadataState(CATALOG)
    for action, event, t, restore in steps:
        if action == "event":
            if restore and event.job_id in state.jobs:
                # A worker rebuilt from the store puts jobs back as the store kept them.
                state.restore_job(state.jobs[event.job_id])
            state.apply_job(event)
            continue
        for gpu in GPUS:
            probe = GpuSample(ts=t, node="n1", gpu_uuid=gpu, gpu_name="x")
            ids = state.jobs_by_gpu.get(gpu)
            expected = _explicit_holder(probe, [state.jobs[j] for j in ids or ()])
            found = state._holder(gpu, ids, t) if ids else None
            assert found is expected


def test_a_finished_job_whose_end_moves_without_a_change_is_still_found() -> None:
    """A repeated 'succeeded' with a later ts moves the end of a job that sent no ended_at,
    yet changes nothing that apply_job counts as a change: the index must not trust ends it
    did not see move."""
    state = MetadataState(CATALOG)
    state.apply_job(
        JobEvent(ts=T0, job_id="j1", state=JobState.running, gpu_uuids=["GPU-a"], started_at=T0)
    )
    state.apply_job(JobEvent(ts=T0 + 10, job_id="j1", state=JobState.succeeded))
    ids = state.jobs_by_gpu["GPU-a"]
    assert state._holder("GPU-a", ids, T0 + 15) is None
    state.apply_job(JobEvent(ts=T0 + 20, job_id="j1", state=JobState.succeeded))
    assert state._holder("GPU-a", ids, T0 + 15) is state.jobs["j1"]
