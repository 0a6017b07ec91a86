"""The broker, then the store, away for 60 s while agents keep sending: the worker holds its
place, retries, catches up, and stores every sample once. The two outages run side by side
(each rig has its own broker, store and worker) so that the suite pays 60 s once."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpuledger.schema.messages import JobEvent, JobState
from tests.faults.rig import T0, USD_PER_H100_HOUR, FaultRow, Fleet, Rig, until
from tests.support import rows

pytestmark = pytest.mark.integration

OUTAGE_S = 60.0


def broker_away_for_60_s(rig: Rig) -> tuple[Fleet, FaultRow]:
    fleet = Fleet("brk", nodes=10, gpus=2)
    prefix = f"GPU-{fleet.prefix}-"
    # 150 s of event time over about 25 s of wall time; the broker freezes 5 s in. The
    # agents' producer buffers and retries what it sends meanwhile (and may send some twice).
    stream = rig.stream(fleet, T0, 150, per_wall_s=6)
    until(lambda: rig.tally(prefix)[0] > 0, 60, "the first samples stored")
    time.sleep(3)
    rig.broker.pause()
    try:
        time.sleep(OUTAGE_S)
    finally:
        rig.broker.resume()
    sent = stream.join()
    rig.wait_stored(prefix, sent)
    return fleet, rig.row("broker away 60 s", fleet, sent)


def store_away_for_60_s(rig: Rig) -> tuple[Fleet, FaultRow]:
    fleet = Fleet("sto", nodes=10, gpus=2)
    prefix = f"GPU-{fleet.prefix}-"
    stream = rig.stream(fleet, T0, 150, per_wall_s=6)
    until(lambda: rig.tally(prefix)[0] > 0, 60, "the first samples stored")
    time.sleep(3)
    rig.pause_store()
    try:
        # While the store is frozen, a late job start names a GPU from T0: the correction
        # waits for the store like everything else.
        rig.sender.send(
            "jobs",
            "sto-train",
            JobEvent(
                ts=T0 + 100,
                job_id="sto-train",
                state=JobState.running,
                team="search",
                gpu_uuids=[fleet.gpu(0, 0)],
                started_at=T0,
            ),
        )
        rig.sender.flush()
        time.sleep(OUTAGE_S)
    finally:
        rig.resume_store()
    sent = stream.join()
    rig.wait_stored(prefix, sent)
    usd = 150 * USD_PER_H100_HOUR / 3600

    def job_usd() -> float:
        found = rows(
            rig.client, "SELECT cost_usd FROM gpuledger.job_costs WHERE job_id = 'sto-train'"
        )
        return float(found[0][0]) if found else 0.0

    until(lambda: abs(job_usd() - usd) <= 1e-9 * usd, 60, "the job's correction")
    return fleet, rig.row("store away 60 s", fleet, sent)


def test_the_broker_and_the_store_each_away_for_60_s_lose_and_double_nothing(
    make_rig: Callable[..., Rig],
) -> None:
    scenarios = {
        "broker": (make_rig("broker"), broker_away_for_60_s),
        "store": (make_rig("store"), store_away_for_60_s),
    }
    for rig, _ in scenarios.values():
        # Started here, not in a pool thread: a child's PR_SET_PDEATHSIG fires when the
        # *thread* that started it ends.
        rig.worker()
    with ThreadPoolExecutor(max_workers=len(scenarios)) as pool:
        running = {name: pool.submit(run, rig) for name, (rig, run) in scenarios.items()}
        outcomes = {name: future.result(timeout=400) for name, future in running.items()}
    for name, (fleet, row) in outcomes.items():
        rig = scenarios[name][0]
        rig.assert_exact(fleet, row, USD_PER_H100_HOUR)
        # The same worker rode the outage out: it neither died nor stopped.
        assert all(w.proc is not None and w.proc.poll() is None for w in rig.workers), name
        assert "Traceback" not in "".join(w.log() for w in rig.workers), f"{name}: see the log"
