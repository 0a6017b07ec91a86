"""The per (job, GPU, hour) rollup behind the analyst views (040_job_gpu_hour.sql): the views
that read it give the answers fact scans give, after cancels and restates,
for windows that cut hours, and after a backfill of facts stored before the rollup existed.

The reference is the views as fact scans (tests/fixtures/fact_scan_views.sql), created under
`<view>_scan`, reading cost_facts row by row.
"""

from __future__ import annotations

import random
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from gpuledger.schema.migrate import available, migrate, shipped_dir, split_statements
from tests.integration.test_schema import FACT_COLUMNS, insert_facts, insert_job, negated

pytestmark = pytest.mark.integration

T = datetime(2026, 5, 4, 9, 40, tzinfo=UTC)
STEP = timedelta(seconds=30)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PLAIN_VIEWS = ["job_costs", "idle_waste"]
WINDOWED_VIEWS = ["job_resource_profile", "focus_hourly_charges", "gpu_hourly_demand"]
# Output columns that identify a row (floats are compared approximately, the rest exactly).
KEYS = {
    "job_costs": ["job_id"],
    "idle_waste": ["team", "project", "job_id", "gpu_uuid", "node"],
    "job_resource_profile": [
        "job_id", "gpu_model", "mig_profile", "provider", "region", "pricing_model",
    ],
    "focus_hourly_charges": [
        "hour", "gpu_uuid", "node", "gpu_model", "mig_profile", "job_id", "team", "project",
        "job_type", "experiment_id", "provider", "region", "pricing_model",
    ],
    "gpu_hourly_demand": ["hour", "provider", "region", "gpu_model", "mig_profile",
                          "pricing_model"],
}  # fmt: skip
WINDOWS = [
    (T - timedelta(days=1), T + timedelta(days=1)),  # everything
    (T, T + timedelta(hours=2, minutes=40)),  # from the first fact to just after the last
    (T.replace(minute=0) + timedelta(hours=1), T.replace(minute=0) + timedelta(hours=2)),
    (T + timedelta(minutes=37, seconds=30), T + timedelta(hours=2, minutes=2, seconds=10)),
    (T + timedelta(minutes=65), T + timedelta(minutes=66)),  # inside one cancelled cell
]


# -- the fleet ------------------------------------------------------------------------------
def fact_row(
    ts: datetime,
    gpu: str,
    job: str,
    rng: random.Random,
    *,
    team: str = "",
    mig: bool = False,
    pricing_model: str = "on_demand",
) -> list[Any]:
    """One 30 s fact of `gpu` with NVML-like util (whole percent, NULL on a MIG slice)."""
    util = None if mig else rng.randint(0, 100) / 100
    rate = 1.8 if mig else 3.6
    cost = rate * 30 / 3600
    values = {
        "ts": ts, "sign": 1, "node": "node-1", "gpu_uuid": gpu,
        "gpu_model": "A100" if mig else "H100", "mig_profile": "1g.10gb" if mig else "",
        "job_id": job, "team": team if job else "", "project": f"{team}-p" if job else "",
        "job_type": "training" if job else "", "experiment_id": "", "provider": "aws",
        "region": "us-east-1", "pricing_model": pricing_model, "duration_s": 30.0,
        "share": 1.0, "util_sm": util, "mem_used_bytes": rng.randint(1, 80) << 30,
        "power_w": 300.0, "usd_per_gpu_hour": rate, "cost_usd": cost,
        "idle_cost_usd": 0.0 if util is None else cost * (1 - util),
        "allocated": int(bool(job)), "idle": int(bool(job) and util is not None and util < 0.05),
        "price_missing": 0,
        "sm_active": None if util is None else round(util * 0.8, 4),
        "model": f"{team}-model" if job else "", "environment": "prod" if job else "",
    }  # fmt: skip
    return [values[c] for c in FACT_COLUMNS]


# The columns cost_facts had before 040 (later migrations add the rest).
OLDER_COLUMNS = FACT_COLUMNS[: FACT_COLUMNS.index("price_missing") + 1]


def insert_older(ch: Client, rows: list[list[Any]], token: str) -> None:
    """Facts as a store migrated only up to 039 takes them."""
    ch.insert(
        "gpuledger.cost_facts",
        [r[: len(OLDER_COLUMNS)] for r in rows],
        column_names=OLDER_COLUMNS,
        settings={
            "insert_deduplication_token": token,
            "deduplicate_blocks_in_dependent_materialized_views": 1,
        },
    )


def with_values(row: list[Any], **changes: Any) -> list[Any]:
    out = list(row)
    for name, value in changes.items():
        out[FACT_COLUMNS.index(name)] = value
    return out


def column(row: list[Any], name: str) -> Any:
    return row[FACT_COLUMNS.index(name)]


def fleet(rng: random.Random) -> list[list[Any]]:
    """2 h 40 min of four GPUs from 09:40: job-1 then job-2 on g-a (the switch at 11:10),
    job-3 on g-b, job-4 on the MIG slice g-m (no util), g-c unallocated."""
    rows = []
    for i in range(int(timedelta(hours=2, minutes=40) / STEP)):
        ts = T + i * STEP
        job = "job-1" if ts < T + timedelta(minutes=90) else "job-2"
        rows.append(fact_row(ts, "g-a", job, rng, team="vision"))
        rows.append(fact_row(ts, "g-b", "job-3", rng, team="search"))
        rows.append(fact_row(ts, "g-m", "job-4", rng, team="vision", mig=True))
        rows.append(fact_row(ts, "g-c", "", rng))
    return rows


def late_job_end(rows: list[list[Any]], job: str, gpu: str, end: datetime) -> list[list[Any]]:
    """What the worker writes when `job` turns out to have ended at `end`: its later facts on
    `gpu` cancelled and restated as unallocated GPU time."""
    moved = [
        r
        for r in rows
        if column(r, "job_id") == job and column(r, "gpu_uuid") == gpu and column(r, "ts") >= end
    ]
    unallocated = [
        with_values(r, job_id="", team="", project="", job_type="", allocated=0, idle=0)
        for r in moved
    ]
    return [negated(r) for r in moved] + unallocated


def restated(
    rows: list[list[Any]], job: str, since: datetime, until: datetime, **changes: Any
) -> list[list[Any]]:
    """Cancel and restate `job`'s facts in [since, until) with other attribution values."""
    hit = [r for r in rows if column(r, "job_id") == job and since <= column(r, "ts") < until]
    return [negated(r) for r in hit] + [with_values(r, **changes) for r in hit]


# -- the reference: the views as fact scans ---------------------------------------------------
def create_scan_views(db: Client) -> None:
    """`<view>_scan` for each view that reads the rollup, as a fact scan (the fixture file)."""
    for statement in split_statements((FIXTURES / "fact_scan_views.sql").read_text()):
        db.command(statement)


def rows_of(db: Client, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    result = db.query(sql, parameters=params)
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


def same_value(got: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(got, float):
        return got == pytest.approx(want, rel=1e-9, abs=1e-9)
    return bool(got == want)


def assert_views_match_the_fact_scans(db: Client) -> None:
    """Every rewritten view gives, row for row, what its fact scan gives (floats up to the
    order of summation), for each window of WINDOWS."""
    asks: list[tuple[str, str, dict[str, Any] | None]] = [(view, "", None) for view in PLAIN_VIEWS]
    for start, end in WINDOWS:
        for view in WINDOWED_VIEWS:
            args = "(start = {s:DateTime64(3, 'UTC')}, end = {e:DateTime64(3, 'UTC')})"
            asks.append((view, args, {"s": start, "e": end}))
    compared: dict[str, int] = {}
    for view, args, params in asks:
        got = rows_of(db, f"SELECT * FROM gpuledger.{view}{args}", params)
        want = rows_of(db, f"SELECT * FROM gpuledger.{view}_scan{args}", params)
        compared[view] = compared.get(view, 0) + len(want)
        keyed_got = {tuple(str(r[k]) for k in KEYS[view]): r for r in got}
        keyed_want = {tuple(str(r[k]) for k in KEYS[view]): r for r in want}
        assert sorted(keyed_got) == sorted(keyed_want), f"{view} {params}"
        for key, expected in keyed_want.items():
            actual = keyed_got[key]
            differ = [
                (name, actual[name], value)
                for name, value in expected.items()
                if not same_value(actual[name], value)
            ]
            assert not differ, f"{view} {params} {key}: (column, rollup, scan) {differ}"
    assert all(compared.values()), f"rows compared per view: {compared}; the story tests nothing"


def rollup_cells(db: Client) -> dict[tuple[str, str], tuple[Any, ...]]:
    """(job, gpu) -> the rollup's sums and counts: what a repeated backfill must not move."""
    rows = db.query(
        "SELECT job_id, gpu_uuid, round(sum(cost_usd), 9), sum(rows), sum(cancelled_rows) "
        "FROM gpuledger.cost_job_gpu_hour GROUP BY job_id, gpu_uuid"
    ).result_rows
    return {(job, gpu): tuple(rest) for job, gpu, *rest in rows}


# -- stories --------------------------------------------------------------------------------
@pytest.fixture
def db(ch: Client) -> Client:
    migrate(ch)
    create_scan_views(ch)
    return ch


def test_a_late_job_end_that_cancels_the_last_samples_of_an_hour_reads_as_the_fact_scan(
    db: Client,
) -> None:
    rng = random.Random(40)
    rows = fleet(rng)
    insert_facts(db, rows, token="samples")
    insert_job(db, "job-1", "succeeded", team="vision", project="vision-p", started_at=T)
    assert_views_match_the_fact_scans(db)

    # job-1 ended at 10:45, not 11:10: its samples from 10:45 go to nobody, cancelling the
    # last quarter of hour 10 and the first ten minutes of hour 11 on g-a.
    end = T + timedelta(minutes=65)
    insert_facts(db, late_job_end(rows, "job-1", "g-a", end), token="late-end")
    # job-3's team was corrected for ten minutes inside hour 10, and g-b was on spot.
    insert_facts(
        db,
        restated(rows, "job-3", T + timedelta(minutes=30), T + timedelta(minutes=40),
                 team="ads", project="ads-p", pricing_model="spot"),
        token="late-team",
    )  # fmt: skip
    assert_views_match_the_fact_scans(db)

    jobs = {r["job_id"]: r for r in rows_of(db, "SELECT * FROM gpuledger.job_costs")}
    assert jobs["job-1"]["last_ts"].replace(tzinfo=UTC) == end - STEP  # a live sample, not 11:09:30
    assert jobs["job-1"]["gpu_seconds"] == pytest.approx(65 * 60)
    assert jobs["job-3"]["team"] == "search"  # the latest live sample's team


def test_a_job_moved_wholly_to_another_disappears_from_the_rollup_views(db: Client) -> None:
    rng = random.Random(41)
    rows = [fact_row(T + i * STEP, "g-a", "job-9", rng, team="vision") for i in range(10)]
    insert_facts(db, rows, token="samples")
    insert_facts(db, restated(rows, "job-9", T, T + timedelta(hours=1), job_id="job-8"),
                 token="moved")  # fmt: skip

    assert [r["job_id"] for r in rows_of(db, "SELECT * FROM gpuledger.job_costs")] == ["job-8"]
    assert [r["job_id"] for r in rows_of(db, "SELECT * FROM gpuledger.idle_waste")] == ["job-8"]
    assert_views_match_the_fact_scans(db)


def test_the_backfill_takes_facts_stored_before_the_rollup_once_even_with_writes_between(
    ch: Client, tmp_path: Path
) -> None:
    older = tmp_path / "before_040"
    older.mkdir()
    for entry in shipped_dir().iterdir():
        if entry.name.endswith(".sql") and int(entry.name[:3]) < 40:
            shutil.copyfile(str(entry), older / entry.name)
    shutil.copytree(str(shipped_dir() / "fragments"), older / "fragments")
    migrate(ch, older)
    rng = random.Random(42)
    rows = fleet(rng)
    insert_older(ch, rows, token="samples")
    insert_older(ch, late_job_end(rows, "job-1", "g-a", T + timedelta(minutes=65)),
                 token="late-end")  # fmt: skip

    # The table and its view exist, a worker writes, then the backfill runs.
    backfill = next(m for m in available() if m.version == 40).statements()
    for statement in backfill[:2]:
        ch.command(statement)
    # Busy samples in an hour the backfill also fills: counted twice, they would lift job-3's
    # p95 (the view reads such a cell from the facts).
    later = [
        with_values(fact_row(T + timedelta(hours=2, minutes=40) + i * STEP, "g-b", "job-3", rng,
                             team="search"), util_sm=1.0, idle_cost_usd=0.0)
        for i in range(12)
    ]  # fmt: skip
    insert_older(ch, later, token="samples-later")
    ch.command(backfill[2])
    cells = rollup_cells(ch)
    live_facts = ch.query("SELECT sum(sign) FROM gpuledger.cost_facts").result_rows[0][0]
    assert sum(cell[1] for cell in cells.values()) == live_facts

    # The migration runner finishes 040 (it was never recorded): the backfill runs again.
    assert migrate(ch)[0] == "040_job_gpu_hour.sql"  # later files follow it
    assert rollup_cells(ch) == cells
    create_scan_views(ch)
    assert_views_match_the_fact_scans(ch)


def test_a_block_retried_with_its_token_counts_once_in_the_job_gpu_hour_rollup(db: Client) -> None:
    rng = random.Random(43)
    block = [fact_row(T + i * STEP, "g-a", "job-1", rng, team="vision") for i in range(20)]
    insert_facts(db, block, token="node-1/offset-7")
    insert_facts(db, block, token="node-1/offset-7")  # the worker retried after a timeout

    cost = sum(column(r, "cost_usd") for r in block)
    assert rollup_cells(db) == {("job-1", "g-a"): (pytest.approx(cost), 20, 0)}
    jobs = rows_of(db, "SELECT job_id, gpu_seconds FROM gpuledger.job_costs")
    assert jobs == [{"job_id": "job-1", "gpu_seconds": pytest.approx(20 * 30)}]
