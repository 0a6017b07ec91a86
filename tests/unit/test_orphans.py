"""Orphaned GPU memory: processes holding memory after their job ended, or with no job."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuledger.ledger.cost import JobRecord
from gpuledger.ledger.orphans import OrphanTracker
from gpuledger.ledger.state import MetadataState
from gpuledger.schema.messages import (
    AlertKind,
    AlertState,
    GpuSample,
    JobEvent,
    JobState,
    ProcessLabels,
    ProcessSample,
)
from gpuledger.schema.pricebook import load_gpu_models
from tests.support import gpu_sample

T0 = 1_767_225_600.0
GIB = 1024**3
RATE = 4.0  # USD per GPU-hour


def with_process(
    ts: float, pid: int | None, job: str | None = None, gpu: str = "GPU-1"
) -> GpuSample:
    processes = []
    if pid is not None:
        labels = ProcessLabels(job_id=job) if job else ProcessLabels()
        processes = [ProcessSample(pid=pid, name="python", mem_used_bytes=6 * GIB, labels=labels)]
    return gpu_sample("GPU-1", ts, interval_s=60.0, processes=processes)


def no_holder(gpu: str, t: float) -> JobRecord | None:
    return None


ENDED = {"train-1": JobRecord("train-1", team="vision", project="det", ended_at=T0 + 100)}


def test_a_process_left_after_its_job_ended_fires_after_15_minutes_then_resolves() -> None:
    tracker = OrphanTracker(after_s=900)
    samples = [with_process(T0 + 60 * i, 4242, "train-1") for i in range(18)]
    fired = tracker.observe(samples, ENDED, no_holder, {"GPU-1": RATE})
    # Orphaned from the first sample past the job's end (T0+120); 900 s later, at T0+1020,
    # the sample that ends there fires it.
    assert [(e.alert.state, e.alert.ts) for e in fired] == [(AlertState.firing, T0 + 1020)]
    alert = fired[0].alert
    assert alert.kind is AlertKind.orphaned_gpu_memory
    assert (alert.rule, alert.job_id, alert.team, alert.since) == (
        "pid 4242",
        "train-1",
        "vision",
        T0 + 120,
    )
    assert alert.wasted_usd == pytest.approx(RATE * 900 / 3600)
    assert (
        "process 4242 (python) holds 6.0 GiB of GPU memory after job train-1 ended" in alert.message
    )
    gone = tracker.observe([with_process(T0 + 1080, None)], ENDED, no_holder, {"GPU-1": RATE})
    assert [(e.alert.state, e.alert.ts) for e in gone] == [(AlertState.resolved, T0 + 1080)]
    assert tracker.firing() == []


def test_a_process_of_a_live_job_or_on_a_held_gpu_is_not_an_orphan() -> None:
    tracker = OrphanTracker(after_s=60)
    live = {"serve-1": JobRecord("serve-1", team="ml")}
    held = JobRecord("slurm-9", gpu_uuids=("GPU-1",), started_at=T0 - 10)
    samples = [with_process(T0 + 60 * i, 7, "serve-1") for i in range(5)]
    samples += [with_process(T0 + 60 * i, 8) for i in range(5, 10)]
    assert tracker.observe(samples, live, lambda gpu, t: held, {}) == []
    # With no job holding the GPU, the unlabelled process is an orphan with no owner.
    fired = tracker.observe(
        [with_process(T0 + 600 + 60 * i, 8) for i in range(3)], live, no_holder, {}
    )
    assert [(e.alert.job_id, e.alert.rule) for e in fired] == [("", "pid 8")]
    assert "with no job" in fired[0].alert.message


def test_a_restarted_worker_does_not_fire_again_what_was_firing() -> None:
    first = OrphanTracker(after_s=120)
    fired = first.observe([with_process(T0 + 60 * i, 5) for i in range(3)], {}, no_holder, {})
    assert len(fired) == 1
    again = OrphanTracker(after_s=120)
    again.restore([fired[0].alert])
    more = again.observe([with_process(T0 + 180 + 60 * i, 5) for i in range(3)], {}, no_holder, {})
    assert more == []
    done = again.observe([with_process(T0 + 400, None)], {}, no_holder, {})
    assert [e.alert.state for e in done] == [AlertState.resolved]


@settings(max_examples=300, deadline=None)
@given(present=st.lists(st.booleans(), min_size=1, max_size=60), after_min=st.integers(1, 10))
def test_each_run_of_presence_fires_once_when_it_lasts_long_enough_and_resolves_after(
    present: list[bool], after_min: int
) -> None:
    """By hand: a run of consecutive minutes with the orphan present fires once, at the end of
    its `after_min`-th minute, if it lasts that long; the first minute without it resolves it."""
    tracker = OrphanTracker(after_s=after_min * 60)
    samples = [with_process(T0 + 60 * i, 9 if here else None) for i, here in enumerate(present)]
    events = tracker.observe(samples, {}, no_holder, {"GPU-1": RATE})
    want: list[tuple[AlertState, float]] = []
    run_start: int | None = None
    for i, here in enumerate([*present, False]):
        if here and run_start is None:
            run_start = i
        if here and run_start is not None and i - run_start + 1 == after_min:
            want.append((AlertState.firing, T0 + 60 * (i + 1)))
        if not here and run_start is not None:
            if i - run_start >= after_min and i < len(present):
                want.append((AlertState.resolved, T0 + 60 * i))
            run_start = None
    assert [(e.alert.state, e.alert.ts) for e in events] == want
    for event in events:
        if event.alert.state is AlertState.firing:
            assert event.alert.wasted_usd == pytest.approx(RATE * after_min / 60)


def test_the_holder_an_orphan_is_judged_by_is_the_one_costing_attributes_the_gpu_to() -> None:
    state = MetadataState(load_gpu_models())
    state.apply_job(JobEvent(ts=T0, job_id="slurm-9", state=JobState.running, team="ml",
                             gpu_uuids=["GPU-1"], started_at=T0 - 3600))  # fmt: skip
    state.apply_job(JobEvent(ts=T0 + 60, job_id="slurm-9", state=JobState.succeeded, ended_at=T0))
    held = state.holder("GPU-1", T0 - 60)
    assert held is not None and held.job_id == "slurm-9"
    assert state.holder("GPU-1", T0 + 60) is None
    assert state.holder("GPU-2", T0 - 60) is None
    # The same answer the cost model gives: a fact on either side of the job's end.
    (before,) = state.cost_all([gpu_sample("GPU-1", T0 - 60)])
    (after,) = state.cost_all([gpu_sample("GPU-1", T0 + 60)])
    assert (before.job_id, after.job_id) == ("slurm-9", "")
