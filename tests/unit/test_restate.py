"""Cancel and restate, decided without a store: which rows are live, which to rewrite."""

from __future__ import annotations

from typing import cast

from hypothesis import given
from hypothesis import strategies as st

from gpuledger.ledger.factrows import FACT_COLUMNS, VALUE_COLUMNS, fact_row, row_columns
from gpuledger.ledger.restate import Scope, correction, live_rows
from gpuledger.ledger.state import MetadataState
from gpuledger.schema.messages import CostFact, GpuSample, JobEvent, JobState
from gpuledger.schema.pricebook import load_gpu_models

H100 = "NVIDIA H100 80GB HBM3"


def fact(job_id: str, cost: float, ts: float = 10.0, share: float = 1.0) -> CostFact:
    return CostFact(
        ts=ts,
        node="n",
        gpu_uuid="g",
        gpu_model="H100",
        job_id=job_id,
        duration_s=1.0,
        share=share,
        util_sm=0.3,
        usd_per_gpu_hour=3.6,
        cost_usd=cost,
        idle_cost_usd=cost * 0.7,
        allocated=1 if job_id else 0,
        idle=0,
        price_missing=0,
    )


def test_a_cancelled_row_is_no_longer_live() -> None:
    old = fact_row(fact("", 0.001))
    new = fact_row(fact("job", 0.001))
    assert live_rows([(1, old), (-1, old), (1, new)]) == {new: 1}


def test_unchanged_facts_need_no_correction() -> None:
    rows = [fact_row(fact("job", 0.001))]
    assert correction(live_rows([(1, rows[0])]), rows) == ([], [])


def test_a_changed_attribution_cancels_the_old_rows_and_restates_the_new() -> None:
    old = fact_row(fact("", 0.001))
    new = fact_row(fact("job", 0.001))
    cancels, restates = correction(live_rows([(1, old)]), [new])
    assert cancels == [old] and restates == [new]


@given(st.floats(min_value=0, max_value=1), st.floats(min_value=0, max_value=1e6))
def test_rows_compare_as_the_store_returns_them(share: float, ts: float) -> None:
    row = fact_row(fact("j", 0.5, ts=ts, share=share))
    again = fact_row(
        fact(
            "j",
            0.5,
            ts=round(ts * 1000) / 1000,
            share=cast(float, row[FACT_COLUMNS.index("share") - 1]),
        )
    )
    assert row == again


def test_row_values_put_the_sign_in_its_column() -> None:
    row = fact_row(fact("j", 0.5))
    columns = row_columns([(-1, row)])
    assert columns["sign"] == [-1]
    assert list(columns) == list(FACT_COLUMNS)
    assert columns["share"] == [row[VALUE_COLUMNS.index("share")]]


def test_a_late_job_event_scopes_its_gpus_from_its_start() -> None:
    state = MetadataState(load_gpu_models())
    scopes = state.apply_job(
        JobEvent(ts=50.0, job_id="j", state=JobState.running, gpu_uuids=["g"], started_at=10.0)
    )
    assert any(s.gpu_uuids == frozenset({"g"}) and s.t_from == 10.0 for s in scopes)
    # The same state again corrects nothing.
    again = JobEvent(ts=60.0, job_id="j", state=JobState.running, gpu_uuids=["g"], started_at=10.0)
    assert state.apply_job(again) == []
    # The re-cost now gives the sample to the job.
    facts = state.cost_all(
        (GpuSample(ts=11.0, node="n", gpu_uuid="g", gpu_name=H100, util_sm=0.5),)
    )
    assert [f.job_id for f in facts] == ["j"]


def test_a_job_finish_rescopes_only_the_time_after_its_end() -> None:
    state = MetadataState(load_gpu_models())
    state.apply_job(
        JobEvent(ts=5.0, job_id="j", state=JobState.running, gpu_uuids=["g"], started_at=10.0)
    )
    scopes = state.apply_job(
        JobEvent(ts=500.0, job_id="j", state=JobState.succeeded, ended_at=400.0)
    )
    assert scopes == [Scope(gpu_uuids=frozenset({"g"}), t_from=400.0, t_to=None)]
    # A later correction of the end moves only the time between the two ends.
    scopes = state.apply_job(JobEvent(ts=600.0, job_id="j", ended_at=300.0))
    assert scopes == [Scope(gpu_uuids=frozenset({"g"}), t_from=300.0, t_to=400.0)]
    facts = state.cost_all(
        (GpuSample(ts=350.0, node="n", gpu_uuid="g", gpu_name=H100, util_sm=0.5),)
    )
    assert [f.job_id for f in facts] == [""]
