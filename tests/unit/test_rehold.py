"""Holder spans (ledger/rehold.py) against the cost model: for any jobs on a GPU, the span the
store would join a fact to (the last one starting at or before the fact's millisecond) names
the job `allocate` gives the GPU at the sample's own time, with the tags that job's rows
carry; only a fact at a span's own first millisecond is left to the worker."""

from __future__ import annotations

import bisect

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuledger.ledger.cost import UNALLOCATED, allocate
from gpuledger.ledger.factrows import VALUE_COLUMNS, fact_row
from gpuledger.ledger.rehold import holder_spans
from gpuledger.ledger.reprice import SINCE_START_MS
from gpuledger.ledger.state import MetadataState
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import JOB_TAGS, GpuSample, JobEvent, JobType, PriceEntry
from gpuledger.schema.pricebook import load_gpu_models

GPUS = ("g1", "g2")
H100 = "NVIDIA H100 80GB HBM3"

event = st.builds(
    lambda k, job, fields: JobEvent(ts=100.0 + k, job_id=job, **fields),
    # Event times off the millisecond: a finish's own time ends a job between two of them.
    st.integers(0, 60).map(lambda k: k + 0.0004 * (k % 3)),
    st.sampled_from(["j1", "j2", "j3"]),
    st.fixed_dictionaries(
        {},
        optional={
            "team": st.sampled_from(["nlp", "vision"]),
            "job_type": st.sampled_from(list(JobType)),
            "state": st.sampled_from(["running", "succeeded"]),
            "gpu_uuids": st.lists(st.sampled_from(GPUS), min_size=1, max_size=2, unique=True),
            "started_at": st.sampled_from([95.0, 110.0, 110.5, 130.0]),
            "ended_at": st.sampled_from([120.0, 140.0]),
        },
    ),
)
# Sample times around the changes, some within a millisecond of one.
times = st.lists(
    st.integers(90_000, 170_000).map(lambda ms: ms / 1000)
    | st.sampled_from([110.0004, 119.9996, 120.0004, 130.0, 140.0004]),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(event, min_size=1, max_size=8), times, st.booleans())
def test_a_holder_span_names_whom_costing_the_sample_gives_the_gpu(
    events: list[JobEvent], ts: list[float], bounded: bool
) -> None:
    state = MetadataState(load_gpu_models())
    state.apply_price(
        PriceEntry(
            provider="*", region="*", gpu_model="H100", pricing_model="on_demand",
            usd_per_gpu_hour=4.0,
        )
    )  # fmt: skip
    for change in events:
        state.apply_job(change)
    t_from, t_to = (100.0, 150.0) if bounded else (None, None)
    spans = holder_spans(state, GPUS, t_from, t_to)
    for gpu in GPUS:
        mine = [s for s in spans if s.gpu_uuid == gpu]
        assert mine[0].since_ms == SINCE_START_MS
        starts = [s.since_ms for s in mine]
        assert starts == sorted(set(starts))
        for t in ts:
            if bounded and not 100.0 <= t < 150.0:
                continue
            at = bisect.bisect_right(starts, to_ms(t)) - 1
            span = mine[at]
            if span.since_ms == to_ms(t):
                continue  # the store leaves a fact at a span's first millisecond
            sample = GpuSample(ts=t, node="n", gpu_uuid=gpu, gpu_name=H100, util_sm=0.5)
            (share,) = allocate(sample, [state.jobs[j] for j in state.jobs_by_gpu[gpu]], {})
            assert span.job_id == share.job.job_id
            if share.job is not UNALLOCATED:
                (fact,) = state.cost_all([sample])
                row = dict(zip(VALUE_COLUMNS, fact_row(fact), strict=True))
                assert span.tags == tuple(row[name] for name in JOB_TAGS)


def test_of_two_changes_in_one_millisecond_the_later_holds_on() -> None:
    state = MetadataState(load_gpu_models())
    state.apply_job(JobEvent(ts=1.0, job_id="a", state="running", gpu_uuids=["g1"], started_at=95))
    state.apply_job(JobEvent(ts=2.0, job_id="b", state="running", gpu_uuids=["g1"], started_at=110))
    # b finishes 0.4 ms after it started: from then on a holds the GPU again.
    state.apply_job(JobEvent(ts=110.0004, job_id="b", state="succeeded"))
    spans = holder_spans(state, ["g1"], None, None)
    assert [(s.since_ms, s.job_id) for s in spans] == [
        (SINCE_START_MS, ""),
        (95_000, "a"),
        (110_000, "a"),
    ]
    assert state.holder("g1", 110.001) is state.jobs["a"]
