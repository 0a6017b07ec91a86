"""What a job change says it alters (`MetadataState.apply_job`'s scopes) against what costing
every sample before and after the change gives: every fact that changes is in a scope, and a
change of tags alone (`Scope.retag`) is exactly the facts carrying the job's id taking the new
tag values, which is all the store does for it."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuledger.ledger.factrows import VALUE_COLUMNS, Row, fact_row
from gpuledger.ledger.restate import Scope
from gpuledger.ledger.state import MetadataState
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import JobEvent, JobState, JobType, PriceEntry, PricingModel
from gpuledger.schema.pricebook import load_gpu_models

H100 = "NVIDIA H100 80GB HBM3"
GPUS = ("g1", "g2")
JOBS = ("j1", "j2")
AT = {name: i for i, name in enumerate(VALUE_COLUMNS)}

labels = st.fixed_dictionaries(
    {"job_id": st.sampled_from(JOBS)},
    optional={"team": st.sampled_from(["nlp", "vision"]), "model": st.just("llama")},
)
process = st.builds(
    lambda pid, util, lab: {"pid": pid, "util_sm": util, "labels": lab},
    st.integers(1, 4),
    st.sampled_from([None, 0.0, 0.3, 0.6]),
    st.one_of(st.just({}), labels),
)
sample = st.builds(
    lambda gpu, k, util, procs: {
        "ts": 1000.0 + k,
        "node": "n",
        "gpu_uuid": gpu,
        "gpu_name": H100,
        "util_sm": util,
        "mem_used_bytes": 1 << 30,
        "processes": procs,
    },
    st.sampled_from(GPUS),
    st.integers(0, 30),
    st.sampled_from([None, 0.01, 0.5]),
    st.lists(process, max_size=3),
)
event = st.builds(
    lambda k, job, fields: JobEvent(ts=995.0 + k, job_id=job, **fields),
    st.integers(0, 40),  # a finish's own time ends the job: some fall among the samples
    st.sampled_from(JOBS),
    st.fixed_dictionaries(
        {},
        optional={
            "team": st.sampled_from(["nlp", "vision", "search"]),
            "project": st.sampled_from(["p1", "p2"]),
            "job_type": st.sampled_from(list(JobType)),
            "experiment_id": st.just("e1"),
            "environment": st.sampled_from(["prod", "dev"]),
            "state": st.sampled_from(["running", "succeeded", "failed"]),
            "gpu_uuids": st.lists(st.sampled_from(GPUS), min_size=1, max_size=2, unique=True),
            "started_at": st.sampled_from([990.0, 1005.0, 1012.0]),
            "ended_at": st.sampled_from([1008.0, 1020.0]),
            "labels": st.just({"queue": "gpu"}),
        },
    ),
)


def facts_by_key(state: MetadataState, samples: list[Any]) -> dict[tuple[str, int], Counter[Row]]:
    from gpuledger.schema.messages import GpuSample

    by_key: dict[tuple[str, int], Counter[Row]] = {}
    for fact in state.cost_all([GpuSample.model_validate(s) for s in samples]):
        row = fact_row(fact)
        by_key.setdefault((fact.gpu_uuid, to_ms(fact.ts)), Counter())[row] += 1
    return by_key


def covers(scope: Scope, key: tuple[str, int], rows: Counter[Row]) -> bool:
    """Whether a stored fact at `key` (its rows `rows`) is in `scope`, as the store's filter
    selects it."""
    gpu, ts_ms = key
    if scope.gpu_uuids is not None and gpu not in scope.gpu_uuids:
        return False
    if scope.t_from is not None and ts_ms < to_ms(scope.t_from):
        return False
    if scope.t_to is not None and ts_ms >= to_ms(scope.t_to):
        return False
    return scope.job_id is None or any(r[AT["job_id"]] == scope.job_id for r in rows)


def retagged(rows: Counter[Row], scope: Scope) -> Counter[Row]:
    jobs = scope.job_ids if scope.job_ids is not None else {scope.job_id}
    out: Counter[Row] = Counter()
    for row, n in rows.items():
        if row[AT["job_id"]] in jobs:
            values = list(row)
            for column, value in scope.retag:
                values[AT[column]] = value
            row = tuple(values)
        out[row] += n
    return out


# A job's end moved, nothing else of it.
end_moved = st.builds(
    lambda k, job, end: JobEvent(ts=995.0 + k, job_id=job, ended_at=end),
    st.integers(0, 40),
    st.sampled_from(JOBS),
    st.sampled_from([1003.0, 1008.0, 1020.0, 1025.0]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(sample, min_size=1, max_size=12),
    st.lists(st.one_of(event, end_moved), min_size=1, max_size=6),
)
def test_a_job_change_scopes_every_fact_it_alters_and_a_retag_is_exact(
    samples: list[Any], events: list[JobEvent]
) -> None:
    state = MetadataState(load_gpu_models())
    state.apply_price(
        PriceEntry(
            provider="*", region="*", gpu_model="H100", pricing_model=PricingModel.on_demand,
            usd_per_gpu_hour=4.0,
        )
    )  # fmt: skip
    first = facts_by_key(state, samples)
    every: list[Scope] = []
    for change in events:
        before = facts_by_key(state, samples)
        scopes = state.apply_job(change)
        every += scopes
        after = facts_by_key(state, samples)
        for key in before.keys() | after.keys():
            old, new = before.get(key, Counter()), after.get(key, Counter())
            if old != new:
                assert any(covers(s, key, old) for s in scopes), (key, scopes)
        for scope in scopes:
            if scope.retag:
                assert len(scopes) == 1
                assert {k: retagged(rows, scope) for k, rows in before.items()} == after
    if every and all(s.retag for s in every):
        # The retags of a whole batch, merged as the worker applies them, in any order.
        now = first
        for scope in reversed(state.merged_retags(every)):
            now = {k: retagged(rows, scope) for k, rows in now.items()}
        assert now == facts_by_key(state, samples)


def test_a_change_of_tags_alone_is_a_retag_and_of_labels_alone_nothing() -> None:
    state = MetadataState(load_gpu_models())
    start = JobEvent(ts=1.0, job_id="j", state=JobState.running, gpu_uuids=["g"], started_at=10.0)
    assert not any(s.retag for s in state.apply_job(start))
    assert state.apply_job(JobEvent(ts=2.0, job_id="j", team="nlp", job_type=JobType.notebook)) == [
        Scope(job_id="j", retag=(("team", "nlp"), ("job_type", "notebook")))
    ]
    assert state.apply_job(JobEvent(ts=3.0, job_id="j", labels={"queue": "a"})) == []
    # Two jobs given the same tags are retagged together, with their records' values now.
    later = state.apply_job(JobEvent(ts=3.5, job_id="k", team="nlp", job_type=JobType.notebook))
    later += state.apply_job(JobEvent(ts=3.6, job_id="j", team="cv"))
    assert state.merged_retags(later) == [
        Scope(job_ids=frozenset({"k"}), retag=(("team", "nlp"), ("job_type", "notebook"))),
        Scope(job_ids=frozenset({"j"}), retag=(("team", "cv"),)),
    ]
    renamed = [*state.apply_job(JobEvent(ts=3.7, job_id="k", team="ml"))]
    renamed += state.apply_job(JobEvent(ts=3.7, job_id="j", team="ml"))
    assert state.merged_retags(renamed) == [
        Scope(job_ids=frozenset({"j", "k"}), retag=(("team", "ml"),))
    ]
    # A change of what it holds is more than a retag.
    moved = state.apply_job(JobEvent(ts=4.0, job_id="j", team="cv", gpu_uuids=["g", "h"]))
    assert moved and not any(s.retag for s in moved)
