"""The cost model (ARCHITECTURE.md §3): who had a GPU, what it cost, how much of it was idle."""

from __future__ import annotations

import math
import typing
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from gpuledger.ledger import cost as model
from gpuledger.ledger.cost import (
    UNALLOCATED,
    JobRecord,
    Share,
    allocate,
    merge_job,
    mig_fraction,
)
from gpuledger.ledger.facts import fact_of_row
from gpuledger.ledger.prices import PriceIndex
from gpuledger.schema.messages import (
    CostFact,
    GpuSample,
    IdleBasis,
    JobEvent,
    JobState,
    JobType,
    NodeInfo,
    PriceEntry,
    PricingModel,
    ProcessLabels,
    ProcessSample,
)
from gpuledger.schema.pricebook import load_gpu_models, load_price_book
from tests.support import gpu_sample

CATALOG = load_gpu_models()
T0 = 1_750_000_000.0
GiB = 1024**3


def price(
    usd: float,
    provider: str = "*",
    region: str = "*",
    gpu_model: str = "H100",
    pricing_model: PricingModel = PricingModel.on_demand,
    effective_from: float = 0.0,
) -> PriceEntry:
    return PriceEntry(
        provider=provider,
        region=region,
        gpu_model=gpu_model,
        pricing_model=pricing_model,
        usd_per_gpu_hour=usd,
        effective_from=effective_from,
    )


def node(provider: str = "aws", region: str = "us-east-1", **kwargs: Any) -> NodeInfo:
    return NodeInfo(ts=T0, node="n1", provider=provider, region=region, **kwargs)


def proc(
    pid: int, job_id: str | None, util_sm: float | None, mem_gib: float = 0, **labels: Any
) -> ProcessSample:
    return ProcessSample(
        pid=pid,
        util_sm=util_sm,
        mem_used_bytes=int(mem_gib * GiB),
        labels=ProcessLabels(job_id=job_id, **labels),
    )


def sample(**kwargs: Any) -> GpuSample:
    fields: dict[str, Any] = {
        "ts": T0,
        "util_sm": 0.9,
        "mem_used_bytes": 40 * GiB,
        "power_w": 500.0,
    }
    return gpu_sample(**{**fields, **kwargs})


def sample_facts(s: GpuSample, shares: list[Share], **context: Any) -> list[CostFact]:
    """The model's rows of one sample, as the `CostFact`s they are."""
    return [fact_of_row(row) for row in model.cost_sample(s, shares, **context)]


def cost(
    s: GpuSample, shares: list[Share], book: list[PriceEntry], n: NodeInfo | None = None
) -> list[CostFact]:
    return sample_facts(s, shares, node=n, price_index=PriceIndex(book), catalog=CATALOG)


# --- price lookup -----------------------------------------------------------------------


def test_price_lookup_prefers_exact_region_then_provider_then_anywhere() -> None:
    index = PriceIndex(
        [
            price(9.0),
            price(7.0, provider="aws"),
            price(5.0, provider="aws", region="us-east-1"),
        ]
    )
    on_demand = PricingModel.on_demand

    def usd(provider: str, region: str) -> float | None:
        entry = index.lookup(provider, region, "H100", on_demand, T0)
        return entry.usd_per_gpu_hour if entry else None

    assert usd("aws", "us-east-1") == 5.0
    assert usd("aws", "eu-west-1") == 7.0
    assert usd("gcp", "us-central1") == 9.0
    assert usd("*", "*") == 9.0
    assert index.lookup("aws", "us-east-1", "H100", PricingModel.spot, T0) is None
    assert index.lookup("aws", "us-east-1", "T4", on_demand, T0) is None


def test_price_lookup_takes_the_latest_price_in_effect_and_ignores_future_ones() -> None:
    index = PriceIndex(
        [
            price(12.0, provider="aws", region="us-east-1"),
            price(7.0, provider="aws", region="us-east-1", effective_from=T0),
            price(5.0, provider="aws", region="us-east-1", effective_from=T0 + 3600),
            price(1.0),
        ]
    )

    def usd(t: float) -> float:
        entry = index.lookup("aws", "us-east-1", "H100", "on_demand", t)
        assert entry is not None
        return entry.usd_per_gpu_hour

    assert usd(T0 - 1) == 12.0
    assert usd(T0) == 7.0
    assert usd(T0 + 3599.9) == 7.0
    assert usd(T0 + 3600) == 5.0


def test_a_specific_price_not_yet_in_effect_falls_back_to_a_wider_one() -> None:
    index = PriceIndex([price(3.0, provider="aws", effective_from=T0), price(1.0)])
    entry = index.lookup("aws", "us-east-1", "H100", "on_demand", T0 - 10)
    assert entry is not None and entry.usd_per_gpu_hour == 1.0


def test_a_republished_price_key_replaces_the_old_price() -> None:
    index = PriceIndex([price(3.0, provider="aws")])
    replaced = index.add(price(2.5, provider="aws"))
    assert replaced is not None and replaced.usd_per_gpu_hour == 3.0
    assert len(index) == 1
    entry = index.lookup("aws", "x", "H100", PricingModel.on_demand, T0)
    assert entry is not None and entry.usd_per_gpu_hour == 2.5


def test_a_node_override_beats_every_price_book_entry() -> None:
    s = sample()
    book = [price(9.0), price(5.0, provider="aws", region="us-east-1")]
    (fact,) = cost(s, allocate(s, [], {}), book, node(usd_per_gpu_hour=2.0))
    assert fact.usd_per_gpu_hour == 2.0
    assert fact.cost_usd == pytest.approx(2.0 / 3600)
    assert fact.price_missing == 0


def test_a_node_without_node_info_is_priced_on_demand_anywhere() -> None:
    s = sample()
    book = [price(9.0), price(5.0, provider="aws"), price(1.0, pricing_model=PricingModel.spot)]
    (fact,) = cost(s, allocate(s, [], {}), book)
    assert (fact.provider, fact.region, fact.pricing_model) == ("*", "*", "on_demand")
    assert fact.usd_per_gpu_hour == 9.0


def test_the_packaged_book_prices_an_aws_h100_at_the_cut_price_after_june_2025() -> None:
    index = PriceIndex(load_price_book())
    before = index.lookup("aws", "us-east-1", "H100", "on_demand", 1_700_000_000.0)
    after = index.lookup("aws", "us-east-1", "H100", "on_demand", T0)
    assert before is not None and after is not None
    assert before.usd_per_gpu_hour == pytest.approx(98.32 / 8)
    assert after.usd_per_gpu_hour == pytest.approx(55.04 / 8)


# --- MIG --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "gpu_model", "fraction"),
    [
        (None, "H100", 1.0),
        ("", "A100-80GB", 1.0),
        ("1g.10gb", "A100-80GB", 1 / 7),
        ("3g.40gb", "A100-80GB", 3 / 7),
        ("7g.80gb", "H100", 1.0),
        ("2g.12gb", "A30", 2 / 4),
        ("1c.3g.40gb", "A100-80GB", 1 / 7),
        ("1g.10gb", None, 1 / 7),
        ("1g.10gb", "T4", 1 / 7),
        ("weird", "H100", 1.0),
        ("MIG 2g.20gb", "H100", 2 / 7),
    ],
)
def test_a_mig_instance_costs_its_slice_fraction(
    profile: str | None, gpu_model: str | None, fraction: float
) -> None:
    assert mig_fraction(profile, gpu_model, CATALOG) == pytest.approx(fraction)


def test_a_mig_slice_is_billed_a_seventh_and_never_counted_idle() -> None:
    s = sample(
        gpu_name="NVIDIA A100-SXM4-80GB",
        mig_profile="1g.10gb",
        util_sm=None,
        mem_used_bytes=5 * GiB,
        processes=[proc(1, "j1", None, 5)],
    )
    (fact,) = cost(s, allocate(s, [], {}), [price(7.0, gpu_model="A100-80GB")])
    assert fact.usd_per_gpu_hour == pytest.approx(1.0)
    assert fact.cost_usd == pytest.approx(1.0 / 3600)
    assert (fact.util_sm, fact.idle_cost_usd, fact.idle) == (None, 0.0, 0)
    assert fact.mig_profile == "1g.10gb"


# --- allocation -------------------------------------------------------------------------


def test_an_explicitly_allocated_gpu_goes_wholly_to_its_job() -> None:
    job = JobRecord("train-1", team="vision", gpu_uuids=("GPU-1",), started_at=T0 - 60)
    s = sample(processes=[proc(1, "someone-else", 0.9)])
    assert allocate(s, [job], {}) == [Share(job, 1.0, True)]


def test_an_ended_job_no_longer_holds_its_gpu() -> None:
    job = JobRecord("train-1", gpu_uuids=("GPU-1",), started_at=T0 - 60, ended_at=T0)
    assert allocate(sample(), [job], {}) == [Share(UNALLOCATED, 1.0, False)]
    other_gpu = JobRecord("train-2", gpu_uuids=("GPU-2",), started_at=T0 - 60)
    assert allocate(sample(), [other_gpu], {}) == [Share(UNALLOCATED, 1.0, False)]
    not_started = JobRecord("train-3", gpu_uuids=("GPU-1",))
    assert allocate(sample(), [not_started], {}) == [Share(UNALLOCATED, 1.0, False)]


def test_a_failed_job_without_ended_at_stops_when_it_was_reported_failed() -> None:
    job = merge_job(None, JobEvent(ts=T0 - 60, job_id="j", gpu_uuids=["GPU-1"], started_at=T0 - 60))
    job = merge_job(job, JobEvent(ts=T0 - 1, job_id="j", state=JobState.failed))
    assert allocate(sample(ts=T0 - 2), [job], {})[0].job.job_id == "j"
    assert allocate(sample(ts=T0), [job], {})[0].job is UNALLOCATED


def test_two_jobs_claiming_one_gpu_go_to_the_latest_started() -> None:
    old = JobRecord("old", gpu_uuids=("GPU-1",), started_at=T0 - 600)
    new = JobRecord("new", gpu_uuids=("GPU-1",), started_at=T0 - 60)
    twin = JobRecord("a-twin", gpu_uuids=("GPU-1",), started_at=T0 - 60)
    assert allocate(sample(), [old, new], {})[0].job is new
    assert allocate(sample(), [old, new, twin], {})[0].job is twin


def test_a_gpu_shared_by_two_labelled_processes_is_split_by_their_utilization() -> None:
    s = sample(
        util_sm=0.8,
        processes=[
            proc(1, "infer-a", 0.6, 10, team="search"),
            proc(2, "infer-b", 0.2, 30, team="ads"),
        ],
    )
    shares = allocate(s, [], {})
    assert [(x.job.job_id, x.job.team, x.allocated) for x in shares] == [
        ("infer-a", "search", True),
        ("infer-b", "ads", True),
    ]
    assert [x.share for x in shares] == pytest.approx([0.75, 0.25])
    facts = cost(s, shares, [price(8.0)])
    assert sum(f.cost_usd for f in facts) == pytest.approx(8.0 / 3600)
    assert [f.util_sm for f in facts] == [0.8, 0.8]
    assert sum(f.mem_used_bytes for f in facts) == 40 * GiB
    assert sum(f.power_w for f in facts) == pytest.approx(500.0)


def test_gpu_utilization_beyond_the_processes_goes_unallocated() -> None:
    s = sample(util_sm=0.8, processes=[proc(1, "a", 0.2), proc(2, None, 0.2)])
    shares = allocate(s, [], {})
    assert [(x.job.job_id, x.allocated) for x in shares] == [("a", True), ("", False)]
    assert [x.share for x in shares] == pytest.approx([0.25, 0.75])


def test_without_utilization_the_split_falls_back_to_memory() -> None:
    s = sample(
        util_sm=None,
        mem_used_bytes=40 * GiB,
        processes=[proc(1, "a", None, 30), proc(2, "b", None, 6)],
    )
    shares = allocate(s, [], {})
    assert [x.job.job_id for x in shares] == ["a", "b", ""]
    assert [x.share for x in shares] == pytest.approx([0.75, 0.15, 0.10])
    s_zero = sample(util_sm=0.0, mem_used_bytes=0, processes=[proc(1, "a", 0.0, 0)])
    assert allocate(s_zero, [], {}) == [Share(JobRecord("a"), 1.0, True)]


def test_processes_without_utilization_on_a_busy_gpu_split_it_by_memory() -> None:
    """The GPU reports util_sm, none of its processes do (no per-process NVML counter): the
    labelled processes still hold it, by memory, instead of the whole GPU going to nobody."""
    s = sample(
        util_sm=0.8,
        mem_used_bytes=40 * GiB,
        processes=[proc(1, "a", None, 30), proc(2, "b", None, 10)],
    )
    shares = allocate(s, [], {})
    assert [(x.job.job_id, x.allocated) for x in shares] == [("a", True), ("b", True)]
    assert [x.share for x in shares] == pytest.approx([0.75, 0.25])
    # When one reports and another is silent, the silent one counts 0, by utilization.
    mixed = sample(util_sm=0.8, processes=[proc(1, "a", 0.4, 30), proc(2, "b", None, 10)])
    assert [x.share for x in allocate(mixed, [], {})] == pytest.approx([0.5, 0.0, 0.5])


def test_an_unallocated_gpu_is_one_unallocated_row_that_is_never_idle() -> None:
    s = sample(util_sm=0.0, processes=[proc(1, None, 0.0, 1)])
    shares = allocate(s, [], {})
    assert shares == [Share(UNALLOCATED, 1.0, False)]
    (fact,) = cost(s, shares, [price(3.6)])
    assert (fact.job_id, fact.allocated, fact.idle, fact.share) == ("", 0, 0, 1.0)
    assert fact.cost_usd == pytest.approx(0.001)
    assert fact.idle_cost_usd == pytest.approx(0.001)


def test_an_allocated_gpu_below_the_idle_threshold_is_idle() -> None:
    job = JobRecord(
        "notebook-7",
        team="research",
        job_type=JobType.notebook,
        gpu_uuids=("GPU-1",),
        started_at=T0 - 1,
    )
    s = sample(util_sm=0.04, interval_s=2.0)
    (fact,) = cost(s, allocate(s, [job], {}), [price(3.6)])
    assert (fact.job_id, fact.team, fact.job_type) == ("notebook-7", "research", "notebook")
    assert (fact.allocated, fact.idle, fact.duration_s) == (1, 1, 2.0)
    assert fact.cost_usd == pytest.approx(0.002)
    assert fact.idle_cost_usd == pytest.approx(0.002 * 0.96)
    busy = cost(sample(util_sm=0.05), [Share(job, 1.0, True)], [price(3.6)])[0]
    assert busy.idle == 0


def test_a_label_job_is_described_by_its_job_record_first_then_its_labels() -> None:
    known = JobRecord("j", team="platform", project=None)
    s = sample(
        util_sm=0.5,
        processes=[proc(1, "j", 0.5, team="stale", project="llm", job_type="inference")],
    )
    (share,) = allocate(s, [], {"j": known})
    assert (share.job.team, share.job.project, share.job.job_type) == (
        "platform",
        "llm",
        JobType.inference,
    )


def test_an_unknown_gpu_model_keeps_its_name_and_shows_the_price_missing() -> None:
    s = sample(gpu_name="NVIDIA GeForce RTX 4090")
    (fact,) = cost(s, allocate(s, [], {}), [price(9.0)])
    assert (fact.gpu_model, fact.price_missing, fact.cost_usd) == (
        "NVIDIA GeForce RTX 4090",
        1,
        0.0,
    )
    (priced,) = cost(s, allocate(s, [], {}), [], node(usd_per_gpu_hour=0.5))
    assert (priced.price_missing, priced.usd_per_gpu_hour) == (0, 0.5)


def test_a_missing_price_costs_nothing_but_is_flagged() -> None:
    s = sample(gpu_name="Tesla T4", processes=[proc(1, "a", 0.5)])
    facts = cost(s, allocate(s, [], {}), [price(9.0)], node("gcp", "us-central1"))
    assert [(f.price_missing, f.cost_usd, f.idle_cost_usd) for f in facts] == [(1, 0.0, 0.0)] * 2
    assert facts[0].gpu_model == "T4"


# --- job merge --------------------------------------------------------------------------


def test_a_partial_job_event_keeps_what_was_known() -> None:
    job = merge_job(
        None,
        JobEvent(
            ts=T0,
            job_id="j",
            state=JobState.running,
            team="vision",
            project="detector",
            job_type=JobType.training,
            gpu_uuids=["GPU-1", "GPU-2"],
            started_at=T0,
            labels={"model": "yolo"},
        ),
    )
    job = merge_job(
        job, JobEvent(ts=T0 + 50, job_id="j", state=JobState.succeeded, ended_at=T0 + 50)
    )
    assert job.state is JobState.succeeded
    assert (job.team, job.project, job.job_type) == ("vision", "detector", JobType.training)
    assert job.gpu_uuids == ("GPU-1", "GPU-2")
    assert (job.started_at, job.ended_at, job.ts) == (T0, T0 + 50, T0 + 50)
    assert dict(job.labels) == {"model": "yolo"}


def test_an_older_job_event_arriving_late_fills_gaps_but_never_overwrites() -> None:
    newer = JobEvent(ts=T0 + 50, job_id="j", state=JobState.succeeded, team="vision-v2")
    older = JobEvent(
        ts=T0,
        job_id="j",
        state=JobState.running,
        team="vision",
        project="detector",
        labels={"a": "old", "b": "old"},
    )
    job = merge_job(merge_job(None, newer), older)
    assert (job.state, job.team, job.project) == (JobState.succeeded, "vision-v2", "detector")
    assert job.ts == T0 + 50
    in_order = merge_job(merge_job(None, older), newer)
    assert (in_order.state, in_order.team, in_order.project) == (job.state, job.team, job.project)
    relabelled = merge_job(job, JobEvent(ts=T0 - 5, job_id="j", labels={"a": "older", "c": "x"}))
    assert dict(relabelled.labels) == {"a": "old", "b": "old", "c": "x"}


def test_a_job_rebuilt_from_the_store_is_not_overwritten_by_an_older_event() -> None:
    rebuilt = JobRecord("j", state=JobState.failed, team="vision", ts=T0 + 100)
    job = merge_job(rebuilt, JobEvent(ts=T0, job_id="j", state=JobState.running, project="p"))
    assert (job.state, job.team, job.project) == (JobState.failed, "vision", "p")


def test_a_requeued_job_with_a_new_start_holds_its_gpu_again() -> None:
    job = merge_job(None, JobEvent(ts=T0, job_id="j", gpu_uuids=["GPU-1"], started_at=T0))
    job = merge_job(
        job, JobEvent(ts=T0 + 10, job_id="j", state=JobState.preempted, ended_at=T0 + 10)
    )
    job = merge_job(
        job, JobEvent(ts=T0 + 100, job_id="j", state=JobState.running, started_at=T0 + 100)
    )
    assert job.ended_at is None
    assert allocate(sample(ts=T0 + 50), [job], {})[0].job is UNALLOCATED
    assert allocate(sample(ts=T0 + 150), [job], {})[0].job.job_id == "j"
    # The preemption event replayed late does not end the new run.
    late = merge_job(
        job, JobEvent(ts=T0 + 10, job_id="j", state=JobState.preempted, ended_at=T0 + 10)
    )
    assert (late.state, late.ended_at) == (JobState.running, None)


# --- properties -------------------------------------------------------------------------


def _bounds(model: type[BaseModel], name: str) -> dict[str, Any]:
    """Hypothesis float bounds read from the pydantic field's own constraints."""
    info = model.model_fields[name]
    metadata = list(info.metadata)
    for arg in typing.get_args(info.annotation):
        for extra in getattr(arg, "__metadata__", ()):
            metadata.extend(getattr(extra, "metadata", ()))
    kwargs: dict[str, Any] = {}
    for constraint in metadata:
        for attr, key, exclude in (
            ("ge", "min_value", None),
            ("gt", "min_value", "exclude_min"),
            ("le", "max_value", None),
            ("lt", "max_value", "exclude_max"),
        ):
            if hasattr(constraint, attr):
                kwargs[key] = float(getattr(constraint, attr))
                if exclude:
                    kwargs[exclude] = True
    return kwargs


def floats_for(
    model: type[BaseModel], name: str, *, cap: float | None = None, floor: float | None = None
) -> st.SearchStrategy[float]:
    kwargs = _bounds(model, name)
    if cap is not None:
        kwargs["max_value"] = min(kwargs.get("max_value", cap), cap)
    if floor is not None:
        kwargs["min_value"] = max(kwargs.get("min_value", floor), floor)
        if kwargs["min_value"] == floor:
            kwargs.pop("exclude_min", None)
    return st.floats(allow_nan=False, allow_infinity=False, **kwargs)


def optional(model: type[BaseModel], name: str, inner: st.SearchStrategy[Any]) -> Any:
    return (
        st.none() | inner
        if type(None) in typing.get_args(model.model_fields[name].annotation)
        else inner
    )


UUIDS = ["GPU-1", "GPU-2"]
JOB_IDS = ["a", "b", "c"]
PRODUCT_NAMES = [
    "NVIDIA H100 80GB HBM3",
    "NVIDIA A100-SXM4-80GB",
    "NVIDIA A30",
    "Tesla T4",
    "NVIDIA GeForce RTX 4090",
]
TS = floats_for(GpuSample, "ts", floor=1.6e9, cap=1.9e9)

processes = st.builds(
    ProcessSample,
    pid=st.integers(0, 2**22),
    util_sm=optional(ProcessSample, "util_sm", floats_for(ProcessSample, "util_sm")),
    mem_used_bytes=st.integers(0, 80 * GiB),
    labels=st.builds(
        ProcessLabels,
        job_id=st.none() | st.sampled_from(JOB_IDS),
        team=st.none() | st.sampled_from(["t1", "t2"]),
    ),
)

samples = st.builds(
    GpuSample,
    ts=TS,
    node=st.just("n1"),
    gpu_uuid=st.sampled_from(UUIDS),
    gpu_name=st.sampled_from(PRODUCT_NAMES),
    mig_profile=st.none() | st.sampled_from(["1g.10gb", "2g.20gb", "3g.40gb", "1c.3g.40gb"]),
    interval_s=floats_for(GpuSample, "interval_s", floor=1e-3),
    util_sm=optional(GpuSample, "util_sm", floats_for(GpuSample, "util_sm")),
    sm_active=optional(GpuSample, "sm_active", floats_for(GpuSample, "sm_active")),
    mem_used_bytes=st.integers(0, 80 * GiB),
    power_w=optional(GpuSample, "power_w", floats_for(GpuSample, "power_w", cap=1500.0)),
    processes=st.lists(processes, max_size=5),
)


@st.composite
def job_records(draw: st.DrawFn) -> JobRecord:
    started = draw(st.none() | TS)
    ended = draw(st.none() | TS)
    return JobRecord(
        job_id=draw(st.sampled_from(JOB_IDS)),
        state=draw(st.none() | st.sampled_from(JobState)),
        team=draw(st.none() | st.sampled_from(["t1", "t2"])),
        gpu_uuids=tuple(draw(st.lists(st.sampled_from(UUIDS), unique=True))),
        started_at=started,
        ended_at=ended,
        ts=draw(TS),
    )


prices = st.builds(
    PriceEntry,
    provider=st.sampled_from(["*", "aws"]),
    region=st.sampled_from(["*", "us-east-1"]),
    gpu_model=st.sampled_from(sorted(CATALOG.models)),
    pricing_model=st.sampled_from(PricingModel),
    usd_per_gpu_hour=floats_for(PriceEntry, "usd_per_gpu_hour", cap=100.0),
    effective_from=st.sampled_from([0.0]) | TS,
).filter(lambda e: e.provider != "*" or e.region == "*")

nodes = st.none() | st.builds(
    NodeInfo,
    ts=TS,
    node=st.just("n1"),
    provider=st.sampled_from(["*", "aws", "gcp"]),
    region=st.sampled_from(["*", "us-east-1"]),
    pricing_model=st.sampled_from(PricingModel),
    usd_per_gpu_hour=st.none() | floats_for(NodeInfo, "usd_per_gpu_hour", cap=100.0),
)


def expected_gpu_cost(s: GpuSample, n: NodeInfo | None, book: list[PriceEntry]) -> float | None:
    """What the whole GPU costs over the sample, from the lookup rules, whoever had it."""
    model = CATALOG.model_for(s.gpu_name)
    if n is not None and n.usd_per_gpu_hour is not None:
        usd = n.usd_per_gpu_hour
    else:
        if model is None:
            return None
        entry = PriceIndex(book).lookup(
            n.provider if n else "*",
            n.region if n else "*",
            model,
            n.pricing_model if n else PricingModel.on_demand,
            s.ts,
        )
        if entry is None:
            return None
        usd = entry.usd_per_gpu_hour
    return usd * mig_fraction(s.mig_profile, model, CATALOG) * s.interval_s / 3600


@settings(max_examples=300, deadline=None)
@given(samples, st.lists(job_records(), max_size=4), st.lists(prices, max_size=8), nodes)
def test_any_sample_is_shared_out_whole_and_costs_its_price_whoever_had_it(
    s: GpuSample, jobs: list[JobRecord], book: list[PriceEntry], n: NodeInfo | None
) -> None:
    shares = allocate(s, jobs, {j.job_id: j for j in jobs})
    assert math.isclose(math.fsum(x.share for x in shares), 1.0, abs_tol=1e-9)
    assert all(0.0 <= x.share <= 1.0 for x in shares)
    assert len({x.job.job_id for x in shares}) == len(shares)

    facts = sample_facts(s, shares, node=n, price_index=PriceIndex(book), catalog=CATALOG)
    assert len(facts) == len(shares)
    for fact in facts:
        assert CostFact.model_validate(fact.model_dump()) == fact
        assert fact.cost_usd >= 0.0
        assert 0.0 <= fact.idle_cost_usd <= fact.cost_usd
        assert fact.idle <= fact.allocated
    total = math.fsum(f.cost_usd for f in facts)
    expected = expected_gpu_cost(s, n, book)
    if expected is None:
        assert total == 0.0 and all(f.price_missing == 1 for f in facts)
    else:
        assert math.isclose(total, expected, rel_tol=1e-9, abs_tol=1e-15)
        assert all(f.price_missing == 0 for f in facts)
    assert sum(f.mem_used_bytes for f in facts) == s.mem_used_bytes


@settings(max_examples=300, deadline=None)
@given(
    st.lists(samples, min_size=1, max_size=3),
    st.lists(job_records(), max_size=4),
    st.lists(prices, max_size=8),
    nodes,
    st.lists(st.sampled_from(IdleBasis), min_size=3, max_size=3),
    st.sampled_from([0.0, 0.05, 0.3, 1.0]),
)
def test_idle_cost_and_idleness_follow_the_chosen_utilization(
    series: list[GpuSample],
    jobs: list[JobRecord],
    book: list[PriceEntry],
    n: NodeInfo | None,
    bases: list[IdleBasis],
    threshold: float,
) -> None:
    by_id = {j.job_id: j for j in jobs}
    index = PriceIndex(book)
    # one GPU's samples in a row, the basis changing between them: the row memo must follow
    for s, basis in zip(series, bases, strict=False):
        facts = sample_facts(
            s,
            allocate(s, jobs, by_id),
            node=n,
            price_index=index,
            catalog=CATALOG,
            idle_threshold=threshold,
            idle_basis=basis,
        )
        judged = s.util_sm
        if basis is IdleBasis.sm_active and s.sm_active is not None:
            judged = s.sm_active
        for fact in facts:
            assert (fact.util_sm, fact.sm_active) == (s.util_sm, s.sm_active)
            if judged is None:
                assert (fact.idle_cost_usd, fact.idle) == (0.0, 0)
                continue
            assert math.isclose(
                fact.idle_cost_usd, fact.cost_usd * (1.0 - judged), rel_tol=1e-12, abs_tol=1e-18
            )
            assert fact.idle == int(bool(fact.allocated) and judged < threshold)


def test_a_tiny_kernel_gpu_is_busy_by_busy_time_and_idle_by_sm_activity() -> None:
    job = JobRecord("spin", gpu_uuids=("GPU-1",), started_at=T0 - 1)
    s = sample(util_sm=0.99, sm_active=0.03, interval_s=10.0)
    shares = allocate(s, [job], {})
    book = PriceIndex([price(3.6)])
    (busy,) = sample_facts(s, shares, node=None, price_index=book, catalog=CATALOG)
    (idle,) = sample_facts(
        s, shares, node=None, price_index=book, catalog=CATALOG, idle_basis=IdleBasis.sm_active
    )
    assert busy.cost_usd == idle.cost_usd == pytest.approx(0.01)  # $3.60/h for 10 s
    assert (busy.idle, busy.idle_cost_usd) == (0, pytest.approx(0.01 * 0.01))
    assert (idle.idle, idle.idle_cost_usd) == (1, pytest.approx(0.01 * 0.97))
    # a GPU without GPM is judged by its busy time whatever the basis
    old = sample(util_sm=0.99, interval_s=10.0)
    (fact,) = sample_facts(
        old, shares, node=None, price_index=book, catalog=CATALOG, idle_basis=IdleBasis.sm_active
    )
    assert (fact.idle, fact.sm_active) == (0, None)


@settings(max_examples=200, deadline=None)
@given(samples, st.lists(job_records(), max_size=4), st.lists(prices, max_size=8), nodes)
def test_costing_two_halves_of_an_interval_costs_the_same_as_the_whole(
    s: GpuSample, jobs: list[JobRecord], book: list[PriceEntry], n: NodeInfo | None
) -> None:
    half = s.interval_s / 2
    mid = s.ts + half
    # Prices and allocations that change inside the interval rightly cost the halves differently.
    moments = [e.effective_from for e in book] + [
        t for j in jobs for t in (j.started_at, j.ended_at, j.end(), j.field_ts.get("state")) if t
    ]
    assume(not any(s.ts < t <= mid for t in moments))
    by_id = {j.job_id: j for j in jobs}
    index = PriceIndex(book)

    def total(part: GpuSample) -> float:
        shares = allocate(part, jobs, by_id)
        facts = sample_facts(part, shares, node=n, price_index=index, catalog=CATALOG)
        return math.fsum(f.cost_usd for f in facts)

    whole = total(s)
    halves = total(s.model_copy(update={"interval_s": half})) + total(
        s.model_copy(update={"ts": mid, "interval_s": half})
    )
    assert math.isclose(whole, halves, rel_tol=1e-9, abs_tol=1e-15)


@settings(max_examples=100, deadline=None)
@given(samples, st.lists(job_records(), max_size=4), st.lists(prices, max_size=8), nodes)
def test_repricing_with_the_same_price_book_gives_the_same_facts(
    s: GpuSample, jobs: list[JobRecord], book: list[PriceEntry], n: NodeInfo | None
) -> None:
    shares = allocate(s, jobs, {j.job_id: j for j in jobs})
    first = sample_facts(s, shares, node=n, price_index=PriceIndex(book), catalog=CATALOG)
    republished = PriceIndex(book)
    for entry in book:
        republished.add(entry)
    again = sample_facts(s, shares, node=n, price_index=republished, catalog=CATALOG)
    assert again == first
    assert allocate(s, jobs, {j.job_id: j for j in jobs}) == shares
