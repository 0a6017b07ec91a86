"""What a worker decides when it takes over from another life of itself (or another worker):
the state it rebuilds, the facts a change may touch, and the tokens of its corrections."""

from __future__ import annotations

from gpuledger.ledger.cost import JobRecord
from gpuledger.ledger.factrows import fact_row
from gpuledger.ledger.restate import Scope, correction_token
from gpuledger.ledger.state import MetadataState
from gpuledger.schema.messages import (
    GpuSample,
    JobEvent,
    JobState,
    NodeInfo,
    PriceEntry,
    PricingModel,
)
from gpuledger.schema.pricebook import load_gpu_models
from gpuledger.streams.metadata import floors

H100 = "NVIDIA H100 80GB HBM3"


def state() -> MetadataState:
    return MetadataState(load_gpu_models())


def stored_copy(job: JobRecord) -> JobRecord:
    """The job as `jobs` gives it back: times to the millisecond, field times exact."""
    return JobRecord(
        job_id=job.job_id,
        state=job.state,
        team=job.team,
        gpu_uuids=job.gpu_uuids,
        started_at=None if job.started_at is None else round(job.started_at * 1000) / 1000,
        ended_at=None if job.ended_at is None else round(job.ended_at * 1000) / 1000,
        ts=round(job.ts * 1000) / 1000,
        field_ts=dict(job.field_ts),
    )


def test_a_restored_job_merges_a_late_event_as_the_worker_that_lived_through_it() -> None:
    lived = state()
    lived.apply_job(JobEvent(ts=100.0, job_id="j", state=JobState.running, gpu_uuids=["g"]))
    lived.apply_job(JobEvent(ts=300.0, job_id="j", team="vision"))
    restored = state()
    restored.restore_job(stored_copy(lived.jobs["j"]))
    # The start, stamped 150: newer than the state's field (100), older than the team's.
    late = JobEvent(ts=150.0, job_id="j", state=JobState.running, started_at=120.0)
    assert lived.apply_job(late) and restored.apply_job(late)
    assert restored.jobs["j"] == lived.jobs["j"]
    assert restored.jobs["j"].started_at == 120.0


def test_job_times_are_kept_to_the_millisecond_as_the_store_keeps_them() -> None:
    s = state()
    s.apply_job(JobEvent(ts=1.0, job_id="j", gpu_uuids=["g"], started_at=10.0004))
    assert s.jobs["j"].started_at == 10.0
    # So a sample stamped within that millisecond belongs to the job, before and after a
    # restart alike.
    facts = s.cost_all([GpuSample(ts=10.0002, node="n", gpu_uuid="g", gpu_name=H100)])
    assert [f.job_id for f in facts] == ["j"]


def test_recovery_scopes_cover_a_jobs_facts_and_its_gpus_from_its_start() -> None:
    s = state()
    s.apply_job(JobEvent(ts=1.0, job_id="j", gpu_uuids=["g1", "g2"], started_at=50.0))
    assert s.job_recovery_scopes("j") == [
        Scope(job_id="j"),
        Scope(gpu_uuids=frozenset({"g1", "g2"}), t_from=50.0),
    ]
    assert s.job_recovery_scopes("never-started") == [Scope(job_id="never-started")]


def price(usd: float, effective_from: float, provider: str = "*", region: str = "*") -> PriceEntry:
    return PriceEntry(
        provider=provider,
        region=region,
        gpu_model="H100",
        pricing_model=PricingModel.spot,
        usd_per_gpu_hour=usd,
        effective_from=effective_from,
    )


def test_a_backdated_price_touches_its_series_facts_up_to_the_next_entry() -> None:
    s = state()
    s.apply_price(price(2.0, 0.0, "aws", "us-east-1"))
    s.apply_price(price(2.5, 1000.0, "aws", "us-east-1"))
    scopes = s.apply_price(price(2.2, 500.0, "aws", "us-east-1"))
    assert scopes == [
        Scope(
            gpu_model="H100",
            provider="aws",
            region="us-east-1",
            pricing_model="spot",
            t_from=500.0,
            t_to=1000.0,
            price_only=True,
        )
    ]
    # A wildcard entry filters nothing on the place it does not name.
    (wide,) = s.apply_price(price(3.0, 0.0))
    assert (wide.provider, wide.region, wide.t_to) == (None, None, None)
    # The same entry again (as a topic replayed after a restart gives it) touches nothing.
    assert s.apply_price(price(2.2, 500.0, "aws", "us-east-1")) == []


def test_a_node_info_touches_its_node_until_the_next_one() -> None:
    s = state()
    first = s.apply_node(NodeInfo(ts=100.0, node="n", provider="aws"))
    assert first == [Scope(node="n", price_only=True)]  # the first also governs what came before it
    later = s.apply_node(NodeInfo(ts=300.0, node="n", provider="aws", usd_per_gpu_hour=2.0))
    assert later == [Scope(node="n", t_from=300.0, price_only=True)]
    between = s.apply_node(NodeInfo(ts=200.0, node="n", provider="aws", usd_per_gpu_hour=1.0))
    assert between == [Scope(node="n", t_from=200.0, t_to=300.0, price_only=True)]
    # The same moment described again replaces what was said of it.
    again = NodeInfo(ts=200.0, node="n", provider="aws", usd_per_gpu_hour=1.5)
    assert s.apply_node(again) == [Scope(node="n", t_from=200.0, t_to=300.0, price_only=True)]
    assert [n.usd_per_gpu_hour for n in s.nodes()] == [None, 1.5, 2.0]
    assert s.apply_node(again) == []


def test_a_corrections_token_is_the_digest_of_the_rows_it_was_decided_from() -> None:
    s = state()
    s.apply_price(
        PriceEntry(
            provider="*",
            region="*",
            gpu_model="H100",
            pricing_model=PricingModel.on_demand,
            usd_per_gpu_hour=4.0,
        )
    )
    sample = GpuSample(ts=10.0, node="n", gpu_uuid="g", gpu_name=H100, util_sm=0.5)
    (fact,) = s.cost_all([sample])
    row = fact_row(fact)
    history = [(1, row)]
    token = correction_token([("g", history)])
    # Read again (a retry, or a second worker reading the same rows): the same token.
    assert correction_token([("g", list(reversed(history)))]) == token
    # Once a correction is stored the history is longer: a later correction differs even
    # when it writes the same rows again (A -> B -> A).
    longer = [*history, (-1, row), (1, row)]
    assert correction_token([("g", longer)]) != token
    assert correction_token([("h", history)]) != token


def test_the_scope_log_keeps_what_the_slowest_partition_owner_may_redo() -> None:
    progress = {0: {("gpuledger.jobs", 0): 40}, 1: {("gpuledger.jobs", 0): 25}}
    found = floors(progress, {0, 1}, [("gpuledger.jobs", 0), ("gpuledger.prices", 0)])
    assert found == {("gpuledger.jobs", 0): 25, ("gpuledger.prices", 0): 0}
    # A partition no owner ever recorded may have everything to redo.
    assert floors(progress, {0, 1, 2}, [("gpuledger.jobs", 0)]) == {("gpuledger.jobs", 0): 0}
