"""Fast tier: the worker's cost path, in process, against the reference model on many
generated fleets: the same facts, job records, views and totals."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings

from tests.differential.inprocess import InProcessWorker
from tests.reference.compare import differences
from tests.reference.fleets import Fleet, fleets
from tests.reference.model import expect, views

# `make fuzz` raises the budget; `make test` runs this many fleets.
EXAMPLES = int(os.environ.get("GPULEDGER_DIFF_EXAMPLES", "3000"))
CHECKED = {"fleets": 0, "messages": 0, "late_metadata": 0, "samples": 0, "rows": 0}


def check(fleet: Fleet) -> None:
    expected = expect(fleet.messages)
    worker = InProcessWorker()
    for message in fleet.messages:
        worker.take(message["topic"], message["value"])
    rows = worker.rows()
    jobs = worker.jobs()
    found = differences({"jobs": expected.jobs}, {"jobs": jobs})
    found += differences(expected.views, views(rows, jobs, worker.usage))
    assert not found, "the worker disagrees with the reference:\n" + "\n".join(found[:40])
    CHECKED["fleets"] += 1
    CHECKED["messages"] += len(fleet.messages)
    CHECKED["late_metadata"] += fleet.late()
    CHECKED["samples"] += fleet.samples()
    CHECKED["rows"] += len(rows)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fleets())
def test_the_cost_path_agrees_with_the_reference_on_generated_fleets(fleet: Fleet) -> None:
    check(fleet)


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
