"""The fleet funnel: total >= allocated >= active >= effective, in GPU-hours and dollars,
against figures worked out by hand."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuledger.schema.migrate import migrate

pytestmark = pytest.mark.integration

DAY = datetime(2026, 5, 4, tzinfo=UTC)
HOUR = timedelta(hours=1)


def fact(
    gpu: str, at: datetime, usd: float, util: float | None, job: str = "", mig: str = ""
) -> dict[str, Any]:
    allocated = 1 if job else 0
    idle = int(allocated == 1 and util is not None and util < 0.05)
    return {
        "ts": at, "sign": 1, "node": "n1", "gpu_uuid": gpu, "gpu_model": "H100",
        "job_id": job, "team": "vision" if job else "", "project": "det" if job else "",
        "duration_s": 3600.0, "share": 1.0, "util_sm": util, "usd_per_gpu_hour": usd,
        "cost_usd": usd, "idle_cost_usd": usd * (1 - util) if job and util is not None else 0.0,
        "allocated": allocated, "idle": idle, "mig_profile": mig,
    }  # fmt: skip


def insert(client: Client, rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    client.insert(
        "gpuledger.cost_facts", [[r[c] for c in columns] for r in rows], column_names=columns
    )


def funnel(client: Client, by: str = "") -> Sequence[Sequence[Any]]:
    group = f"{by}, " if by else ""
    return client.query(
        f"SELECT {group}round(sum(total_gpu_hours), 6), round(sum(total_usd), 6), "
        "round(sum(allocated_gpu_hours), 6), round(sum(allocated_usd), 6), "
        "round(sum(active_gpu_hours), 6), round(sum(active_usd), 6), "
        "round(sum(effective_gpu_hours), 6), round(sum(effective_usd), 6) "
        "FROM gpuledger.fleet_funnel_daily(start = '2026-05-01', end = '2026-06-01')"
        + (f" GROUP BY {by} ORDER BY {by}" if by else "")
    ).result_rows


@pytest.fixture
def db(ch: Client) -> Client:
    migrate(ch)
    return ch


def test_the_funnel_of_a_small_fleet_matches_the_hand_computed_dollars(db: Client) -> None:
    insert(db, [
        fact("GPU-a", DAY, 4.0, 0.5, "train-1"),  # busy at half: active, half effective
        fact("GPU-a", DAY + HOUR, 4.0, 0.0, "train-1"),  # allocated, idle
        fact("GPU-b", DAY, 4.0, 0.3),  # no job: in the total only
        fact("MIG-c", DAY, 2.0, None, "infer-1", mig="3g.40gb"),  # no utilization
    ])  # fmt: skip
    # total 4 GPU-hours, $14; allocated 3, $10; active 2 (GPU-a's busy hour, the MIG slice),
    # $6; effective 0.5 GPU-hours and $2 (the busy hour at 50 %; the slice measured nothing).
    assert funnel(db) == [(4.0, 14.0, 3.0, 10.0, 2.0, 6.0, 0.5, 2.0)]
    assert funnel(db, "team") == [
        ("", 1.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        ("vision", 3.0, 10.0, 3.0, 10.0, 2.0, 6.0, 0.5, 2.0),
    ]


def test_a_cancelled_fact_leaves_the_funnel(db: Client) -> None:
    busy = fact("GPU-a", DAY, 4.0, 0.8, "train-1")
    insert(db, [busy, {**busy, "sign": -1}, {**busy, "util_sm": 0.0, "idle": 1}])
    assert funnel(db) == [(1.0, 4.0, 1.0, 4.0, 0.0, 0.0, 0.0, 0.0)]


# Each example empties the table first: the store can be shared by the examples.
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=10.0),
            st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0)),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_each_stage_holds_within_the_one_before(
    db: Client, rows: list[tuple[float, float | None, bool]]
) -> None:
    db.command("TRUNCATE TABLE gpuledger.cost_facts")
    insert(db, [
        fact(f"GPU-{i}", DAY, usd, util, "job-1" if held else "")
        for i, (usd, util, held) in enumerate(rows)
    ])  # fmt: skip
    for row in funnel(db, "team"):
        _, total_h, total, alloc_h, alloc, active_h, active, eff_h, eff = row
        assert total_h >= alloc_h >= active_h >= eff_h >= 0
        assert total + 1e-6 >= alloc >= active - 1e-6 and active + 1e-6 >= eff >= -1e-6
