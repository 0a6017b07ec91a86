"""Fast tier: the worker's cost path, in process, against the reference model on many
generated fleets: the same facts, job records, views and totals."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuledger.ledger.idle import IdleTracker
from gpuledger.ledger.idle_rules import IdlePolicy, IdleRule
from gpuledger.schema.messages import AlertState, CostFact, IdleBasis
from tests.differential.inprocess import InProcessWorker
from tests.reference.compare import differences
from tests.reference.fleets import Fleet, fleets
from tests.reference.model import expect, views

# `make fuzz` raises the budget; `make test` runs this many fleets.
EXAMPLES = int(os.environ.get("GPULEDGER_DIFF_EXAMPLES", "3000"))
IDLE_AFTER_S = 3.0  # short, so that small fleets have episodes that fire and some that don't
CHECKED = {"fleets": 0, "messages": 0, "late_metadata": 0, "samples": 0, "rows": 0, "alerts": 0}


def fired(rows: list[dict[str, Any]], basis: IdleBasis) -> set[tuple[str, str]]:
    """The (GPU, job) episodes the worker's idle detection fires on these facts, taken in
    time order as the worker stores them."""
    rule = IdleRule(alert_after_s=IDLE_AFTER_S, basis=basis)
    policy = IdlePolicy(default=rule, update_every_s=0.0)
    facts = [
        CostFact.model_validate(r)
        for r in sorted(rows, key=lambda r: (r["ts"], r["gpu_uuid"], r["job_id"]))
    ]
    return {
        (e.alert.gpu_uuid, e.alert.job_id)
        for e in IdleTracker(policy).observe(facts)
        if e.alert.state == AlertState.firing
    }


def check(fleet: Fleet, basis: IdleBasis = IdleBasis.busy_time) -> None:
    expected = expect(fleet.messages, idle_after_s=IDLE_AFTER_S, idle_basis=basis.value)
    worker = InProcessWorker(idle_basis=basis)
    for message in fleet.messages:
        worker.take(message["topic"], message["value"])
    rows = worker.rows()
    jobs = worker.jobs()
    found = differences({"jobs": expected.jobs}, {"jobs": jobs})
    found += differences(expected.views, views(rows, jobs, worker.usage))
    alerts = fired(rows, basis)
    if alerts != expected.alerts:
        found.append(f"idle alerts: reference {sorted(expected.alerts)}, worker {sorted(alerts)}")
    assert not found, (
        "the worker disagrees with the reference:\n"
        + "\n".join(found[:40])
        + "\nthe fleet, as gpuledger replay lines:\n"
        + fleet.jsonl()
    )
    CHECKED["fleets"] += 1
    CHECKED["messages"] += len(fleet.messages)
    CHECKED["late_metadata"] += fleet.late()
    CHECKED["samples"] += fleet.samples()
    CHECKED["rows"] += len(rows)
    CHECKED["alerts"] += len(alerts)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fleets(idle_after_s=IDLE_AFTER_S), st.sampled_from(IdleBasis))
def test_the_cost_path_agrees_with_the_reference_on_generated_fleets(
    fleet: Fleet, basis: IdleBasis
) -> None:
    check(fleet, basis)


@settings(
    max_examples=max(1, EXAMPLES // 6),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fleets(max_nodes=3, max_gpus=3, max_steps=10))
def test_the_cost_path_agrees_with_the_reference_on_larger_fleets(fleet: Fleet) -> None:
    check(fleet)


def test_the_fast_tier_checked_fleets() -> None:
    """Runs after the properties (file order): it says how much was checked, and fails if the
    property checked nothing."""
    print(f"\nfast tier checked {CHECKED}")
    assert CHECKED["fleets"] > 0 and CHECKED["rows"] > 0
