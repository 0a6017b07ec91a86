"""Metadata that arrives after its samples were costed: a late job start, a late finish, a
backdated price, a late node override. Each changes `job_costs` (and the views that read the
rollups) to the exact corrected dollars, computed here by hand, within 60 s of the message."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from gpuledger.schema.messages import (
    JobEvent,
    JobState,
    JobType,
    NodeInfo,
    PriceEntry,
    PricingModel,
)
from tests.faults.rig import T0, USD_PER_H100_HOUR, Fleet, Rig, until
from tests.support import rows, scalar

pytestmark = pytest.mark.integration

CORRECTION_GOAL_S = 60.0


def job_cost(rig: Rig, job_id: str) -> float | None:
    found = rows(
        rig.client,
        "SELECT cost_usd FROM gpuledger.job_costs WHERE job_id = {j:String}",
        j=job_id,
    )
    return float(found[0][0]) if found else None


def corrected_within_goal(rig: Rig, job_id: str, usd: float, what: str) -> float:
    """Wait (at most the 60 s goal) until `job_costs` says `usd`; return the seconds taken."""
    sent = time.monotonic()
    until(
        lambda: abs((job_cost(rig, job_id) or 0.0) - usd) <= 1e-9 * usd,
        timeout_s=CORRECTION_GOAL_S,
        what=f"{what}: {job_id} to cost ${usd:.12f}",
    )
    return time.monotonic() - sent


def test_late_job_events_backdated_prices_and_late_node_overrides_restate_exact_dollars(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig("late")
    rig.worker()
    fleet = Fleet("late", nodes=2, gpus=1)
    gpu, node = fleet.gpu(0, 0), fleet.node(0)
    sent = rig.send_batches(fleet.batches(T0, 60))
    rig.wait_stored(f"GPU-{fleet.prefix}-", fleet.samples_in(60))
    assert job_cost(rig, "late-train") is None  # nobody knew of the job yet
    latencies: list[float] = []
    s = rig.sender

    # The scheduler's start event arrives 60 s late: the job started at T0+10.
    s.send(
        "jobs",
        "late-train",
        JobEvent(
            ts=T0 + 70,
            job_id="late-train",
            state=JobState.running,
            team="vision",
            project="detector",
            job_type=JobType.training,
            gpu_uuids=[gpu],
            started_at=T0 + 10,
        ),
    )
    s.flush()
    usd = 50 * USD_PER_H100_HOUR / 3600  # samples T0+10 .. T0+59 at $4/h
    latencies.append(corrected_within_goal(rig, "late-train", usd, "late start"))

    # Its end comes later still: it finished at T0+40; the samples after are nobody's.
    s.send(
        "jobs",
        "late-train",
        JobEvent(ts=T0 + 80, job_id="late-train", state=JobState.succeeded, ended_at=T0 + 40),
    )
    s.flush()
    usd = 30 * USD_PER_H100_HOUR / 3600  # T0+10 .. T0+39
    latencies.append(corrected_within_goal(rig, "late-train", usd, "late finish"))

    # A price change backdated to T0+20: H100 on demand costs $6/h from then on.
    s.send(
        "prices",
        "backdated",
        PriceEntry(
            provider="*",
            region="*",
            gpu_model="H100",
            pricing_model=PricingModel.on_demand,
            usd_per_gpu_hour=6.0,
            effective_from=T0 + 20,
        ),
    )
    s.flush()
    usd = (10 * 4.0 + 20 * 6.0) / 3600  # T0+10 .. T0+19 at $4, T0+20 .. T0+39 at $6
    latencies.append(corrected_within_goal(rig, "late-train", usd, "backdated price"))

    # The node's first NodeInfo, stamped T0+30, carries a negotiated $9/h: as the node's
    # first word it also governs the samples before it.
    s.send(
        "nodes",
        node,
        NodeInfo(ts=T0 + 30, node=node, provider="aws", region="us-east-1", usd_per_gpu_hour=9.0),
    )
    s.flush()
    usd = 30 * 9.0 / 3600
    latencies.append(corrected_within_goal(rig, "late-train", usd, "late node override"))

    # And from T0+35 the node's rate is $3/h.
    s.send(
        "nodes",
        node,
        NodeInfo(ts=T0 + 35, node=node, provider="aws", region="us-east-1", usd_per_gpu_hour=3.0),
    )
    s.flush()
    usd = (25 * 9.0 + 5 * 3.0) / 3600  # T0+10 .. T0+34 at $9, T0+35 .. T0+39 at $3
    latencies.append(corrected_within_goal(rig, "late-train", usd, "second node override"))

    # The views that read the hourly rollup agree with the corrected facts.
    team_usd = scalar(
        rig.client,
        "SELECT sum(cost_usd) FROM gpuledger.team_daily WHERE team = 'vision'",
    )
    assert team_usd == pytest.approx(usd, rel=1e-9)
    spend, success = rows(
        rig.client,
        "SELECT total_spend_usd, job_success_rate FROM gpuledger.project_effective_cost "
        "WHERE project = 'detector'",
    )[0]
    assert spend == pytest.approx(usd, rel=1e-9)
    assert success == 1.0
    # Every GPU-second of the fleet, allocated or not, at its corrected price:
    # node 0: T0 .. T0+34 at the override's $9, T0+35 .. T0+59 at $3;
    # node 1: T0 .. T0+19 at $4, T0+20 .. T0+59 at the backdated $6.
    fleet_usd = (35 * 9.0 + 25 * 3.0 + 20 * 4.0 + 40 * 6.0) / 3600
    facts_usd, rollup_usd = rig.dollars(f"GPU-{fleet.prefix}-", f"{fleet.prefix}-node")
    assert facts_usd == pytest.approx(fleet_usd, rel=1e-9)
    assert rollup_usd == pytest.approx(fleet_usd, rel=1e-9)

    row = rig.row("late job, backdated price, late node", fleet, sent * fleet.gpus)
    assert row.duplicated == 0 and row.lost == 0
    print(
        "corrections visible after "
        + ", ".join(f"{t:.1f} s" for t in latencies)
        + f" (goal {CORRECTION_GOAL_S:.0f} s)"
    )
    assert max(latencies) < CORRECTION_GOAL_S
