"""The ClickHouse schema as analysts and the worker meet it: migrations, rollups, views.

Runs against the embedded store (chdb behind ClickHouse's HTTP interface) through
clickhouse-connect, the production path. The numbers in the seeded stories are worked out
by hand in the comments next to them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from gpuledger.schema.migrate import (
    EARLIER_CHECKSUMS,
    MigrationError,
    applied,
    available,
    fragments,
    migrate,
    pending,
    render,
    shipped_dir,
    split_statements,
    views,
)
from gpuledger.store import connect, ensure_store, stop_owned_stores

VIEWS_SQL = "SELECT name FROM system.tables WHERE database = 'gpuledger' AND engine = 'View'"

pytestmark = pytest.mark.integration

DAY1 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)  # a Monday
DAY2 = DAY1 + timedelta(days=1)
TEN_MIN = timedelta(minutes=10)

FACT_COLUMNS = [
    "ts", "sign", "node", "gpu_uuid", "gpu_model", "mig_profile", "job_id", "team", "project",
    "job_type", "experiment_id", "provider", "region", "pricing_model", "duration_s", "share",
    "util_sm", "mem_used_bytes", "power_w", "usd_per_gpu_hour", "cost_usd", "idle_cost_usd",
    "allocated", "idle", "price_missing", "sm_active", "model", "environment",
]  # fmt: skip

VIEWS = {
    "job_costs": [
        "job_id", "team", "project", "job_type", "experiment_id", "state", "started_at",
        "ended_at", "first_ts", "last_ts", "gpu_seconds", "gpu_hours", "cost_usd",
        "idle_cost_usd", "mean_util_sm", "gpus", "mean_sm_active", "model", "environment",
    ],
    "team_daily": [
        "day", "team", "gpu_hours", "cost_usd", "idle_cost_usd", "allocated_cost_usd",
        "price_missing_gpu_hours", "mean_util_sm",
    ],
    "project_effective_cost": [
        "project", "total_spend_usd", "jobs_finished", "jobs_succeeded", "job_success_rate",
        "resource_utilization", "effective_cost_usd", "unpriced_gpu_hours", "sm_utilization",
        "effective_cost_sm_usd",
    ],
    "project_effective_cost_weekly": [
        "week", "project", "total_spend_usd", "jobs_finished", "jobs_succeeded",
        "job_success_rate", "resource_utilization", "effective_cost_usd", "unpriced_gpu_hours",
        "sm_utilization", "effective_cost_sm_usd",
    ],
    "inference_unit_cost": [
        "job_id", "team", "project", "day", "cost_usd", "requests", "tokens",
        "usd_per_1k_requests", "usd_per_1m_tokens",
    ],
    "idle_waste": [
        "team", "project", "job_id", "gpu_uuid", "node", "gpu_seconds", "cost_usd",
        "idle_gpu_seconds", "idle_cost_usd", "idle_share", "wasted_share",
    ],
    "alerts_firing": [
        "ts", "kind", "state", "gpu_uuid", "node", "job_id", "team", "project", "since",
        "idle_seconds", "wasted_usd", "message", "rule",
    ],
}  # fmt: skip


# -- fixtures (`ch`, a client of a fresh store, comes from tests/conftest.py) ------------------
@pytest.fixture
def db(ch: Client) -> Client:
    """A client of a fresh store with every migration applied."""
    migrate(ch)
    return ch


# -- helpers --------------------------------------------------------------------------------
def fact(
    ts: datetime,
    gpu: str,
    job: str = "",
    *,
    team: str = "",
    project: str = "",
    job_type: str = "",
    node: str = "node-1",
    duration_s: float = 600.0,
    share: float = 1.0,
    util: float | None = 0.5,
    usd_per_gpu_hour: float = 3.6,
    idle_threshold: float = 0.05,
    sign: int = 1,
    price_missing: int = 0,
    sm: float | None = None,
) -> list[Any]:
    """One cost_facts row, costed as ARCHITECTURE.md §3 says (3.6 $/h = 0.001 $/s)."""
    allocated = 1 if job else 0
    cost = usd_per_gpu_hour * duration_s / 3600 * share
    idle_cost = 0.0 if util is None else cost * (1 - util)
    idle = int(allocated == 1 and util is not None and util < idle_threshold)
    values = {
        "ts": ts, "sign": sign, "node": node, "gpu_uuid": gpu, "gpu_model": "H100",
        "mig_profile": "", "job_id": job, "team": team, "project": project,
        "job_type": job_type, "experiment_id": "", "provider": "aws", "region": "us-east-1",
        "pricing_model": "on_demand", "duration_s": duration_s, "share": share,
        "util_sm": util, "mem_used_bytes": 1 << 30, "power_w": 300.0,
        "usd_per_gpu_hour": usd_per_gpu_hour, "cost_usd": cost, "idle_cost_usd": idle_cost,
        "allocated": allocated, "idle": idle, "price_missing": price_missing,
        "sm_active": sm, "model": "", "environment": "",
    }  # fmt: skip
    return [values[c] for c in FACT_COLUMNS]


def negated(row: list[Any]) -> list[Any]:
    """The cancel row of a stored fact: the same values with sign -1."""
    out = list(row)
    out[FACT_COLUMNS.index("sign")] = -1
    return out


def insert_facts(ch: Client, rows: list[list[Any]], token: str | None = None) -> None:
    settings = {}
    if token is not None:
        settings = {
            "insert_deduplication_token": token,
            "deduplicate_blocks_in_dependent_materialized_views": 1,
        }
    ch.insert("gpuledger.cost_facts", rows, column_names=FACT_COLUMNS, settings=settings)


def insert_job(
    ch: Client,
    job_id: str,
    state: str,
    *,
    team: str,
    project: str,
    job_type: str = "training",
    started_at: datetime | None = None,
    ended_at: datetime | None = None,
    updated_at: datetime | None = None,
) -> None:
    ch.insert(
        "gpuledger.jobs",
        [
            [
                job_id, state, team, project, job_type, "", [], started_at, ended_at, {},
                updated_at or ended_at or started_at or DAY1,
            ]
        ],
        column_names=[
            "job_id", "state", "team", "project", "job_type", "experiment_id", "gpu_uuids",
            "started_at", "ended_at", "labels", "updated_at",
        ],
    )  # fmt: skip


def query(ch: Client, sql: str) -> list[dict[str, Any]]:
    result = ch.query(sql)
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


def by(rows: list[dict[str, Any]], *keys: str) -> dict[Any, dict[str, Any]]:
    out = {}
    for row in rows:
        key = row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)
        out[key] = row
    return out


def utc(value: datetime | None) -> datetime | None:
    """clickhouse-connect returns UTC times naive or aware; compare them as aware."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def approx(value: float) -> Any:
    """Equal up to Float32 rounding (duration_s, share and util_sm are Float32 columns)."""
    return pytest.approx(value, rel=1e-6, abs=1e-9)


def rollup_cost_by_job(ch: Client, table: str) -> dict[str, float]:
    rows = ch.query(
        f"SELECT job_id, sum(cost_usd) FROM gpuledger.{table} GROUP BY job_id "
        "HAVING sum(rows) != 0 ORDER BY job_id"
    ).result_rows
    return {job: cost for job, cost in rows}


# -- migrations -----------------------------------------------------------------------------
def test_migrating_twice_applies_everything_once_and_then_nothing(ch: Client) -> None:
    shipped = [m.filename for m in available()]
    assert shipped[0] == "000_schema_migrations.sql"
    assert pending(ch) == shipped

    assert migrate(ch) == shipped
    ledger_before = applied(ch)
    tables_before = ch.query(
        "SELECT name, create_table_query FROM system.tables WHERE database = 'gpuledger' "
        "ORDER BY name"
    ).result_rows

    assert migrate(ch) == []
    assert pending(ch) == []
    assert applied(ch) == ledger_before
    assert [a.filename for a in ledger_before] == shipped
    assert [a.checksum for a in ledger_before] == [m.checksum for m in available()]
    assert (
        ch.query(
            "SELECT name, create_table_query FROM system.tables WHERE database = 'gpuledger' "
            "ORDER BY name"
        ).result_rows
        == tables_before
    )


def test_a_new_migration_file_is_applied_alone_on_the_next_run(ch: Client, tmp_path: Path) -> None:
    folder = tmp_path / "clickhouse"
    shutil.copytree(Path(str(shipped_dir())), folder)
    migrate(ch, folder)

    (folder / "900_team_budgets.sql").write_text(
        "-- budgets per team; a ';' inside a comment does not end the statement;\n"
        "CREATE TABLE IF NOT EXISTS gpuledger.team_budgets\n"
        "(team String, usd_per_month Float64, note String DEFAULT 'a; b -- c')\n"
        "ENGINE = MergeTree ORDER BY team;\n"
        "INSERT INTO gpuledger.team_budgets (team, usd_per_month) SELECT 'vision', 5000;\n"
    )
    assert pending(ch, folder) == ["900_team_budgets.sql"]
    assert migrate(ch, folder) == ["900_team_budgets.sql"]
    assert ch.query("SELECT team, usd_per_month, note FROM gpuledger.team_budgets").result_rows == [
        ("vision", 5000.0, "a; b -- c")
    ]
    assert migrate(ch, folder) == []


def test_an_applied_migration_that_changed_stops_the_run_naming_the_file(
    ch: Client, tmp_path: Path
) -> None:
    folder = tmp_path / "clickhouse"
    shutil.copytree(Path(str(shipped_dir())), folder)
    migrate(ch, folder)

    edited = folder / "003_alerts_and_deadletters.sql"
    edited.write_text(edited.read_text() + "\n-- an afterthought\n")
    (folder / "901_later.sql").write_text("CREATE TABLE gpuledger.later (x UInt8) ENGINE = Log;\n")

    with pytest.raises(MigrationError, match=r"003_alerts_and_deadletters\.sql changed after"):
        migrate(ch, folder)
    with pytest.raises(MigrationError, match=r"003_alerts_and_deadletters\.sql"):
        pending(ch, folder)
    # Nothing after the check ran.
    assert ch.query("EXISTS TABLE gpuledger.later").result_rows == [(0,)]


def test_a_database_that_applied_a_files_earlier_text_migrates_and_gets_every_view(
    ch: Client,
) -> None:
    """The files whose views moved to views/, or whose parts moved to fragments/, keep their
    earlier checksums as accepted: a database that recorded any of those texts migrates, and
    ends with every view of views/."""
    migrate(ch)
    for pick in (min, max):  # every file's first and last earlier text
        for name, digests in EARLIER_CHECKSUMS.items():
            version = int(name[:3])
            ch.command(
                f"ALTER TABLE gpuledger.schema_migrations UPDATE checksum = '{pick(digests)}' "
                f"WHERE version = {version} SETTINGS mutations_sync = 2"
            )
        assert migrate(ch) == []
    ch.command("DROP VIEW gpuledger.job_costs")  # as if an earlier release had no such view
    assert migrate(ch) == []
    made = {row[0] for row in ch.query(VIEWS_SQL).result_rows}
    assert made == {view.name for view in views()}
    assert ch.query("SELECT count() FROM gpuledger.job_costs").result_rows == [(0,)]


def test_an_edited_fragment_is_refused_as_an_edit_of_the_applied_files_that_name_it(
    ch: Client, tmp_path: Path
) -> None:
    folder = tmp_path / "clickhouse"
    shutil.copytree(Path(str(shipped_dir())), folder)
    migrate(ch, folder)

    edited = folder / "fragments" / "node_info.sql"
    edited.write_text(edited.read_text().replace("ts DateTime64(3, 'UTC')", "ts DateTime64(6)"))
    with pytest.raises(MigrationError, match=r"002_samples_and_metadata\.sql changed after"):
        migrate(ch, folder)
    (folder / "002_samples_and_metadata.sql").write_text(
        (Path(str(shipped_dir())) / "002_samples_and_metadata.sql")
        .read_text()
        .replace("${node_info}", "${node_info_v2}")
    )
    with pytest.raises(MigrationError, match=r"002_samples_and_metadata\.sql names node_info_v2"):
        migrate(ch, folder)


def test_a_fragment_stands_where_it_is_named_indented_as_the_placeholders_line() -> None:
    parts = {"sums": "sum(a) AS a,\nsumIf(b,\n    c) AS b", "key": "x, y"}
    text = "SELECT\n    ${sums},\n    ${key}\nGROUP BY ${key}, z;"
    assert render("900_x.sql", text, parts) == (
        "SELECT\n    sum(a) AS a,\n    sumIf(b,\n        c) AS b,\n    x, y\nGROUP BY x, y, z;"
    )
    assert fragments()["node_info"].startswith("node String,\n")  # its comment left out
    with pytest.raises(MigrationError, match=r"004_rollups\.sql names rollupp"):
        render("004_rollups.sql", "CREATE TABLE gpuledger.${rollupp} (x UInt8);", parts)


def test_an_earlier_text_is_accepted_for_its_own_file_only(ch: Client) -> None:
    migrate(ch)
    earlier = min(EARLIER_CHECKSUMS["005_analyst_views.sql"])
    ch.command(
        f"ALTER TABLE gpuledger.schema_migrations UPDATE checksum = '{earlier}' "
        "WHERE version = 50 SETTINGS mutations_sync = 2"
    )
    with pytest.raises(MigrationError, match=r"050_usage_identity\.sql changed after"):
        migrate(ch)


def test_views_are_applied_after_the_views_they_read() -> None:
    order = [view.name for view in views()]
    for position, view in enumerate(views()):
        assert not view.reads(set(order[position + 1 :])), view.name
    assert order.index("job_costs") < order.index("job_purpose")  # job_purpose reads job_costs


def test_a_database_newer_than_this_gpuledger_is_refused(ch: Client, tmp_path: Path) -> None:
    folder = tmp_path / "clickhouse"
    shutil.copytree(Path(str(shipped_dir())), folder)
    (folder / "902_from_the_future.sql").write_text("SELECT 1;\n")
    migrate(ch, folder)

    with pytest.raises(MigrationError, match=r"902_from_the_future\.sql is applied"):
        migrate(ch)


def test_a_failing_statement_is_reported_with_its_file_and_left_unrecorded(
    ch: Client, tmp_path: Path
) -> None:
    folder = tmp_path / "clickhouse"
    shutil.copytree(Path(str(shipped_dir())), folder)
    (folder / "903_typo.sql").write_text(
        "CREATE TABLE IF NOT EXISTS gpuledger.ok (x UInt8) ENGINE = Log;\nCREAT TABLE oops;\n"
    )
    with pytest.raises(MigrationError, match=r"903_typo\.sql, statement 2 failed"):
        migrate(ch, folder)
    assert pending(ch, folder) == ["903_typo.sql"]


def test_usage_stored_before_the_identity_migration_keeps_its_figures(
    ch: Client, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    shutil.copytree(Path(str(shipped_dir())), before)
    for later in before.glob("*.sql"):
        if int(later.name[:3]) >= 50:
            later.unlink()
    every = {view.name: view for view in views(before)}
    kept = {"inference_unit_cost"}  # and the views it reads: today's others read later tables
    while more := {n for name in kept for n in every[name].reads(set(every))} - kept:
        kept |= more
    for view in (before / "views").glob("*.sql"):
        if view.stem not in kept:
            view.unlink()
    migrate(ch, before)
    day = "2026-01-01 00:00:10"
    ch.command(
        "INSERT INTO gpuledger.usage (ts, job_id, requests, tokens) "
        f"SELECT toDateTime64('{day}', 3, 'UTC'), 'old-job', number + 1, 10 "
        "FROM numbers(2)"
    )
    assert "050_usage_identity.sql" in migrate(ch)
    assert migrate(ch) == []
    # A run cut short re-runs the whole file: its statements are idempotent.
    identity = next(m for m in available() if m.filename == "050_usage_identity.sql")
    for statement in identity.statements():
        ch.command(statement)
    assert ch.query(
        "SELECT source, sum(requests), count() FROM gpuledger.usage GROUP BY source"
    ).result_rows == [("", 3, 2)]
    requests = ch.query(
        "SELECT requests FROM gpuledger.inference_unit_cost WHERE job_id = 'old-job'"
    ).result_rows
    assert requests == [(3,)]


def test_statements_split_at_semicolons_that_end_a_line() -> None:
    sql = (
        "-- header; not a statement\n"
        "CREATE VIEW v AS SELECT 'x;' AS a, -- trailing comment;\n"
        "  `odd;--name` AS b;  -- done\n"
        "\n"
        "SELECT 1; SELECT 2;\n"
        "SELECT 'it''s' -- ok\n"
    )
    assert split_statements(sql) == [
        "CREATE VIEW v AS SELECT 'x;' AS a, \n  `odd;--name` AS b",
        "SELECT 1; SELECT 2",
        "SELECT 'it''s'",
    ]


# -- views on an empty store ----------------------------------------------------------------
def test_every_view_answers_on_an_empty_store_with_its_documented_columns(db: Client) -> None:
    for view, columns in VIEWS.items():
        described = [row[0] for row in db.query(f"DESCRIBE TABLE gpuledger.{view}").result_rows]
        assert described == columns, view
        assert db.query(f"SELECT * FROM gpuledger.{view}").result_rows == [], view


# -- seeded stories -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """A small fleet on DAY1 (and DAY2 for the inference job), every row 600 s at 3.6 $/h.

    - job-1 (vision/detector, training, succeeded): g1 at 10:00 util 0.5 and 10:10 util 1.0
    - job-2 (vision/detector, training, failed): g2 util 0.0 (idle), g3 a MIG slice (no util,
      1.8 $/h)
    - job-3 (search/ranker, inference, running): half of g4 (share 0.5, util 0.8) on DAY1 and
      DAY2; the other half unallocated
    - job-4 (search/idle-proj, training, succeeded): g5 util 0.0
    - job-5 (vision/sandbox, notebook, unknown to jobs): a MIG slice g7, no util
    - unallocated g6, util 0.0
    - job-6 (vision/detector, succeeded the next week, no GPU time)

    Seeded once for the read-only tests below, in a store of their own started as
    tests/conftest.py starts one (a fresh store per test would cost a second each).
    """
    path = tmp_path_factory.mktemp("fleet") / "store"
    ensure_store(path)
    db = connect(f"chdb://{path}", start=False)
    migrate(db)
    facts = [
        fact(DAY1, "g1", "job-1", team="vision", project="detector", util=0.5),
        fact(DAY1 + TEN_MIN, "g1", "job-1", team="vision", project="detector", util=1.0),
        fact(DAY1, "g2", "job-2", team="vision", project="detector", util=0.0),
        fact(DAY1, "g3", "job-2", team="vision", project="detector", util=None,
             usd_per_gpu_hour=1.8),
        fact(DAY1, "g4", "job-3", team="search", project="ranker", job_type="inference",
             node="node-2", share=0.5, util=0.8),
        fact(DAY1, "g4", node="node-2", share=0.5, util=0.8),
        fact(DAY2, "g4", "job-3", team="search", project="ranker", job_type="inference",
             node="node-2", share=0.5, util=0.8),
        fact(DAY2, "g4", node="node-2", share=0.5, util=0.8),
        fact(DAY1, "g5", "job-4", team="search", project="idle-proj", util=0.0),
        fact(DAY1, "g6", node="node-2", util=0.0),
        fact(DAY1, "g7", "job-5", team="vision", project="sandbox", job_type="notebook",
             util=None, usd_per_gpu_hour=1.8),
    ]  # fmt: skip
    insert_facts(db, facts)
    end1 = DAY1 + timedelta(hours=1)
    insert_job(db, "job-1", "running", team="vision", project="detector", started_at=DAY1)
    insert_job(
        db, "job-1", "succeeded", team="vision", project="detector", started_at=DAY1,
        ended_at=end1 + TEN_MIN,
    )  # fmt: skip
    insert_job(
        db, "job-2", "failed", team="vision", project="detector", started_at=DAY1, ended_at=end1
    )
    insert_job(
        db, "job-3", "running", team="search", project="ranker", job_type="inference",
        started_at=DAY1,
    )  # fmt: skip
    insert_job(
        db, "job-4", "succeeded", team="search", project="idle-proj", started_at=DAY1,
        ended_at=end1,
    )  # fmt: skip
    insert_job(
        db, "job-6", "succeeded", team="vision", project="detector",
        started_at=DAY1 + timedelta(days=7), ended_at=DAY1 + timedelta(days=8),
    )  # fmt: skip
    db.insert(
        "gpuledger.usage",
        [
            [DAY1 + timedelta(minutes=5), "job-3", 1000, 200_000],
            [DAY1 + timedelta(minutes=9), "job-3", 500, 100_000],
        ],
        column_names=["ts", "job_id", "requests", "tokens"],
    )
    yield db
    db.close()
    stop_owned_stores(path)


def test_job_costs_give_each_jobs_gpu_time_dollars_and_outcome(fleet: Client) -> None:
    jobs = by(query(fleet, "SELECT * FROM gpuledger.job_costs"), "job_id")
    assert sorted(jobs) == ["job-1", "job-2", "job-3", "job-4", "job-5"]

    one = jobs["job-1"]
    assert (one["team"], one["project"], one["state"]) == ("vision", "detector", "succeeded")
    assert utc(one["started_at"]) == DAY1
    assert utc(one["ended_at"]) == DAY1 + timedelta(hours=1, minutes=10)
    assert (utc(one["first_ts"]), utc(one["last_ts"])) == (DAY1, DAY1 + TEN_MIN)
    assert one["gpu_seconds"] == approx(1200)
    assert one["gpu_hours"] == approx(1200 / 3600)
    assert one["cost_usd"] == approx(1.2)  # 2 x 600 s x 0.001 $/s
    assert one["idle_cost_usd"] == approx(0.3)  # 0.6 x (1 - 0.5) + 0.6 x 0
    assert one["mean_util_sm"] == approx(0.75)  # (0.5 x 600 + 1.0 x 600) / 1200
    assert one["gpus"] == 1

    two = jobs["job-2"]
    assert (two["state"], two["gpus"]) == ("failed", 2)
    assert two["cost_usd"] == approx(0.6 + 0.3)  # g2 at 3.6 $/h, the MIG slice at 1.8 $/h
    assert two["idle_cost_usd"] == approx(0.6)
    assert two["mean_util_sm"] == approx(0.0)  # the MIG slice (no util) does not count

    three = jobs["job-3"]
    assert (three["job_type"], three["state"]) == ("inference", "running")
    assert three["ended_at"] is None
    assert three["gpu_seconds"] == approx(600)  # half of g4 for 600 s, twice
    assert three["cost_usd"] == approx(0.6)
    assert three["mean_util_sm"] == approx(0.8)

    five = jobs["job-5"]  # never announced: no state, no times, no util
    assert (five["state"], five["started_at"], five["ended_at"]) == ("", None, None)
    assert (five["team"], five["project"], five["job_type"]) == ("vision", "sandbox", "notebook")
    assert five["mean_util_sm"] is None
    assert five["cost_usd"] == approx(0.3)


def test_team_daily_splits_dollars_by_team_and_day(fleet: Client) -> None:
    days = by(query(fleet, "SELECT * FROM gpuledger.team_daily"), "day", "team")
    d1, d2 = date(2026, 3, 2), date(2026, 3, 3)
    assert sorted(days) == [(d1, ""), (d1, "search"), (d1, "vision"), (d2, ""), (d2, "search")]

    vision = days[(d1, "vision")]
    # job-1 1200 s + job-2 1200 s + job-5 600 s
    assert vision["gpu_hours"] == approx(3000 / 3600)
    assert vision["cost_usd"] == approx(1.2 + 0.9 + 0.3)
    assert vision["allocated_cost_usd"] == approx(2.4)
    assert vision["idle_cost_usd"] == approx(0.3 + 0.6)
    assert vision["mean_util_sm"] == approx(0.5)  # (300 + 600 + 0) / 1800; MIG rows excluded

    search = days[(d1, "search")]
    assert search["gpu_hours"] == approx(900 / 3600)  # job-3 300 s + job-4 600 s
    assert search["cost_usd"] == approx(0.9)
    assert search["idle_cost_usd"] == approx(0.06 + 0.6)
    assert search["mean_util_sm"] == approx(0.8 * 300 / 900)

    unallocated = days[(d1, "")]
    assert unallocated["cost_usd"] == approx(0.3 + 0.6)
    assert unallocated["allocated_cost_usd"] == approx(0.0)
    assert days[(d2, "search")]["cost_usd"] == approx(0.3)
    assert days[(d2, "")]["cost_usd"] == approx(0.3)


def test_project_effective_cost_follows_the_formula_and_is_null_when_undefined(
    fleet: Client,
) -> None:
    projects = by(query(fleet, "SELECT * FROM gpuledger.project_effective_cost"), "project")
    assert sorted(projects) == ["detector", "idle-proj", "ranker", "sandbox"]

    detector = projects["detector"]
    assert detector["total_spend_usd"] == approx(2.1)
    assert (detector["jobs_finished"], detector["jobs_succeeded"]) == (3, 2)
    assert detector["job_success_rate"] == approx(2 / 3)
    assert detector["resource_utilization"] == approx(0.5)  # (300 + 600 + 0) / 1800
    assert detector["effective_cost_usd"] == approx(2.1 / (2 / 3 * 0.5))
    assert detector["unpriced_gpu_hours"] == 0

    idle = projects["idle-proj"]  # succeeded, but the GPU did nothing: utilization 0
    assert (idle["job_success_rate"], idle["resource_utilization"]) == (1.0, 0.0)
    assert idle["effective_cost_usd"] is None

    ranker = projects["ranker"]  # nothing finished yet
    assert (ranker["jobs_finished"], ranker["job_success_rate"]) == (0, None)
    assert ranker["effective_cost_usd"] is None

    sandbox = projects["sandbox"]  # MIG only: no utilization known
    assert sandbox["total_spend_usd"] == approx(0.3)
    assert sandbox["resource_utilization"] is None
    assert sandbox["effective_cost_usd"] is None


def test_a_project_with_unpriced_gpu_time_has_no_effective_cost_but_a_flag(db: Client) -> None:
    """Unpriced hours cost 0 in TotalSpend: an EffectiveCost from it would look cheap."""
    t = DAY1 + timedelta(hours=3)
    insert_facts(
        db,
        [
            fact(t, "GPU-p1", "priced-job", project="mixed", util=0.5),
            fact(t, "GPU-p2", "free-job", project="mixed", util=0.5, usd_per_gpu_hour=0.0,
                 price_missing=1),
            fact(t, "GPU-p3", "only-job", project="unpriced", util=0.5, usd_per_gpu_hour=0.0,
                 price_missing=1),
        ],
    )  # fmt: skip
    for job, project in (("priced-job", "mixed"), ("free-job", "mixed"), ("only-job", "unpriced")):
        insert_job(db, job, "succeeded", team="t", project=project, ended_at=t)
    for view in ("project_effective_cost", "project_effective_cost_weekly"):
        projects = by(query(db, f"SELECT * FROM gpuledger.{view}"), "project")
        assert projects["unpriced"]["total_spend_usd"] == 0.0
        assert projects["unpriced"]["effective_cost_usd"] is None
        assert projects["unpriced"]["unpriced_gpu_hours"] == approx(600 / 3600)
        assert projects["mixed"]["effective_cost_usd"] is None
        assert projects["mixed"]["unpriced_gpu_hours"] == approx(600 / 3600)


def test_weekly_effective_cost_counts_jobs_in_the_week_they_ended(fleet: Client) -> None:
    weeks = by(
        query(fleet, "SELECT * FROM gpuledger.project_effective_cost_weekly"), "week", "project"
    )
    first = weeks[(date(2026, 3, 2), "detector")]
    assert (first["jobs_finished"], first["jobs_succeeded"]) == (2, 1)
    assert first["total_spend_usd"] == approx(2.1)
    assert first["effective_cost_usd"] == approx(2.1 / (0.5 * 0.5))

    second = weeks[(date(2026, 3, 9), "detector")]  # job-6 ended, no GPU time that week
    assert (second["jobs_finished"], second["jobs_succeeded"]) == (1, 1)
    assert second["total_spend_usd"] == approx(0.0)
    assert second["resource_utilization"] is None
    assert second["effective_cost_usd"] is None


def test_inference_unit_cost_prices_a_thousand_requests_per_day(fleet: Client) -> None:
    rows = by(query(fleet, "SELECT * FROM gpuledger.inference_unit_cost"), "job_id", "day")
    assert sorted(rows) == [("job-3", date(2026, 3, 2)), ("job-3", date(2026, 3, 3))]

    first = rows[("job-3", date(2026, 3, 2))]
    assert (first["team"], first["project"]) == ("search", "ranker")
    assert (first["requests"], first["tokens"]) == (1500, 300_000)
    assert first["cost_usd"] == approx(0.3)
    assert first["usd_per_1k_requests"] == approx(1000 * 0.3 / 1500)
    assert first["usd_per_1m_tokens"] == approx(1_000_000 * 0.3 / 300_000)

    second = rows[("job-3", date(2026, 3, 3))]  # GPU time but no traffic
    assert (second["requests"], second["cost_usd"]) == (0, approx(0.3))
    assert second["usd_per_1k_requests"] is None
    assert second["usd_per_1m_tokens"] is None


def test_idle_waste_shows_what_allocated_gpus_wasted(fleet: Client) -> None:
    rows = by(query(fleet, "SELECT * FROM gpuledger.idle_waste"), "job_id", "gpu_uuid")
    # The unallocated half of g4 and g6 are not an allocation's waste.
    expected = [
        ("job-1", "g1"), ("job-2", "g2"), ("job-2", "g3"), ("job-3", "g4"), ("job-4", "g5"),
        ("job-5", "g7"),
    ]  # fmt: skip
    assert sorted(rows) == expected

    one = rows[("job-1", "g1")]
    assert (one["team"], one["project"], one["node"]) == ("vision", "detector", "node-1")
    assert one["idle_gpu_seconds"] == approx(0)
    assert one["idle_cost_usd"] == approx(0.3)
    assert one["wasted_share"] == approx(0.25)

    idle = rows[("job-2", "g2")]
    assert idle["idle_gpu_seconds"] == approx(600)
    assert (idle["idle_share"], idle["wasted_share"]) == (approx(1.0), approx(1.0))

    shared = rows[("job-3", "g4")]
    assert shared["gpu_seconds"] == approx(600)
    assert shared["idle_cost_usd"] == approx(2 * 0.3 * 0.2)
    assert shared["wasted_share"] == approx(0.2)
    assert rows[("job-2", "g3")]["wasted_share"] == approx(0.0)  # MIG: no util, no idle cost


# -- corrections and retries ----------------------------------------------------------------
def test_cancel_and_restate_moves_the_dollars_to_the_right_job(db: Client) -> None:
    # The worker first attributed two samples of g8 to job-a by its process labels...
    first = [
        fact(DAY1, "g8", "job-a", team="alpha", project="p-a", util=0.5),
        fact(DAY1 + TEN_MIN, "g8", "job-a", team="alpha", project="p-a", util=0.25),
    ]
    insert_facts(db, first, token="samples-1")
    insert_facts(db, [fact(DAY1, "g9", "job-a", team="alpha", project="p-a")], token="samples-2")
    before = by(query(db, "SELECT * FROM gpuledger.job_costs"), "job_id")
    assert before["job-a"]["cost_usd"] == approx(1.8)

    # ...then a late job event says job-b held g8: cancel the two rows, restate them.
    restated = [
        fact(DAY1, "g8", "job-b", team="beta", project="p-b", util=0.5),
        fact(DAY1 + TEN_MIN, "g8", "job-b", team="beta", project="p-b", util=0.25),
    ]
    insert_facts(db, [negated(r) for r in first] + restated, token="restate-1")

    jobs = by(query(db, "SELECT * FROM gpuledger.job_costs"), "job_id")
    assert jobs["job-a"]["cost_usd"] == approx(0.6)  # only g9 is left
    assert jobs["job-a"]["gpus"] == 1
    assert jobs["job-a"]["mean_util_sm"] == approx(0.5)
    assert jobs["job-b"]["cost_usd"] == approx(1.2)
    assert jobs["job-b"]["team"] == "beta"
    assert jobs["job-b"]["mean_util_sm"] == approx(0.375)
    assert (utc(jobs["job-b"]["first_ts"]), utc(jobs["job-b"]["last_ts"])) == (
        DAY1,
        DAY1 + TEN_MIN,
    )

    for rollup in ("cost_minute", "cost_hour"):
        assert rollup_cost_by_job(db, rollup) == {"job-a": approx(0.6), "job-b": approx(1.2)}
    teams = by(query(db, "SELECT * FROM gpuledger.team_daily"), "team")
    assert teams["alpha"]["cost_usd"] == approx(0.6)
    assert teams["beta"]["cost_usd"] == approx(1.2)

    # Moving every row of a job away leaves no job behind, not a zero row.
    insert_facts(
        db,
        [
            negated(fact(DAY1, "g9", "job-a", team="alpha", project="p-a")),
            fact(DAY1, "g9", "job-b", team="beta", project="p-b"),
        ],
        token="restate-2",
    )
    jobs = by(query(db, "SELECT * FROM gpuledger.job_costs"), "job_id")
    assert sorted(jobs) == ["job-b"]
    assert jobs["job-b"]["gpus"] == 2
    assert sorted(by(query(db, "SELECT * FROM gpuledger.team_daily"), "team")) == ["beta"]
    assert rollup_cost_by_job(db, "cost_hour") == {"job-b": approx(1.8)}


def test_a_block_inserted_twice_with_one_token_counts_once_everywhere(db: Client) -> None:
    block = [fact(DAY1 + timedelta(seconds=s), "g1", "job-1", duration_s=1.0) for s in range(60)]
    insert_facts(db, block, token="node-1/offset-42")
    insert_facts(db, block, token="node-1/offset-42")  # the worker retried after a timeout

    assert db.query("SELECT count(), sum(cost_usd) FROM gpuledger.cost_facts").result_rows == [
        (60, approx(0.06))
    ]
    for rollup in ("cost_minute", "cost_hour"):
        assert db.query(
            f"SELECT sum(rows), sum(cost_usd), sum(gpu_seconds) FROM gpuledger.{rollup}"
        ).result_rows == [(60, approx(0.06), approx(60.0))], rollup

    # Another token is another batch, even with the same rows: tokens, not content, decide.
    insert_facts(db, block, token="node-1/offset-43")
    assert db.query("SELECT sum(rows) FROM gpuledger.cost_hour").result_rows == [(120,)]


def test_alerts_firing_lists_only_episodes_whose_latest_state_is_firing(db: Client) -> None:
    columns = [
        "ts", "kind", "state", "gpu_uuid", "node", "job_id", "team", "project", "since",
        "idle_seconds", "wasted_usd", "message",
    ]  # fmt: skip
    t = DAY1

    def alert(at: datetime, gpu: str, state: str, idle_s: float) -> list[Any]:
        return [at, "idle_allocated_gpu", state, gpu, "node-1", "job-1", "vision", "detector",
                t, idle_s, idle_s / 1000, f"{gpu} idle"]  # fmt: skip

    db.insert(
        "gpuledger.alerts",
        [
            alert(t + timedelta(minutes=10), "g1", "firing", 600),
            alert(t + timedelta(minutes=11), "g1", "firing", 660),
            alert(t + timedelta(minutes=10), "g2", "firing", 600),
            alert(t + timedelta(minutes=12), "g2", "resolved", 720),
        ],
        column_names=columns,
    )
    firing = query(db, "SELECT * FROM gpuledger.alerts_firing")
    assert [(a["gpu_uuid"], a["idle_seconds"]) for a in firing] == [("g1", 660.0)]


def test_dead_letters_keep_the_original_bytes_and_the_reason(db: Client) -> None:
    db.insert(
        "gpuledger.deadletters",
        [[DAY1, "gpuledger.samples", 3, 1234, 2, "util_sm: must be <= 1", "eyJ1dGlsX3NtIjogMn0="]],
        column_names=["ts", "topic", "partition", "offset", "idx", "error", "value_b64"],
    )
    assert db.query(
        "SELECT topic, partition, offset, idx, error FROM gpuledger.deadletters"
    ).result_rows == [("gpuledger.samples", 3, 1234, 2, "util_sm: must be <= 1")]


# -- storage --------------------------------------------------------------------------------
# A synthetic fleet, one row per GPU and second: 8 GPUs a node, jobs of 20 to 90 minutes
# back to back (training near 0.9 util, inference bursty, idle notebooks, unallocated
# stretches, shared GPUs), NVML-like quantisation (util in percent, power in mW), a few
# milliseconds of jitter on each node's sampling clock.
SYNTHETIC_FLEET = """
INSERT INTO gpuledger.cost_facts
WITH
    intDiv(number, {secs:UInt32}) AS gpu,
    number % {secs:UInt32} AS s,
    intDiv(gpu, 8) AS node_no,
    intDiv(s + cityHash64('offset', gpu) % 5400, 1200 + cityHash64('len', gpu) % 4200) AS slot,
    cityHash64('job', gpu, slot) AS job_hash,
    job_hash % 100 AS kind,
    multiIf(kind < 45, 0.9, kind < 65, 0.45, kind < 90, 0.0, 0.6) AS base,
    multiIf(kind < 45, 0.06, kind < 65, 0.2, kind < 90, 0.0, 0.1) AS spread,
    ((cityHash64('u', gpu, s) % 1000 + cityHash64('v', gpu, s) % 1000
      + cityHash64('w', gpu, s) % 1000 + cityHash64('x', gpu, s) % 1000) / 1000.0 - 2.0)
      * 1.7 AS noise,
    toFloat32(round(greatest(0, least(1, base + spread * noise)), 2)) AS util,
    kind >= 75 AND kind < 90 AS unallocated,
    ['ml-research', 'search', 'ads', 'vision', 'speech', 'platform'][1 + job_hash % 6] AS team_of,
    [6.98, 2.45, 4.1][1 + node_no % 3] AS price
SELECT
    toDateTime64('2026-01-01 00:00:00', 3, 'UTC') + toIntervalMillisecond(
        s * 1000 + (node_no * 37) % 1000 + cityHash64('j', node_no, s) % 8) AS ts,
    1 AS sign,
    concat('gpu-node-', leftPad(toString(node_no), 3, '0')) AS node,
    concat('GPU-', lower(hex(cityHash64('uuid', gpu))), '-4a1b-9c2d-',
        lower(hex(cityHash64('tail', gpu)))) AS gpu_uuid,
    'H100' AS gpu_model,
    '' AS mig_profile,
    if(unallocated, '', concat('job-', toString(job_hash % 10000000))) AS job_id,
    if(unallocated, '', team_of) AS team,
    if(unallocated, '', concat(team_of, '-proj', toString(job_hash % 4))) AS project,
    if(unallocated, '', ['training', 'inference', 'notebook', 'tuning'][1 + kind % 4])
        AS job_type,
    if(unallocated, '', concat('exp-', toString(job_hash % 50))) AS experiment_id,
    if(node_no % 3 = 0, 'gcp', 'aws') AS provider,
    if(node_no % 3 = 0, 'europe-west4', 'us-east-1') AS region,
    ['on_demand', 'spot', 'reserved'][1 + node_no % 3] AS pricing_model,
    toFloat32(1) AS duration_s,
    toFloat32(1) AS share,
    util AS util_sm,
    (2000 + job_hash % 76000) * 1048576 AS mem_used_bytes,
    toFloat32(round(70 + util * 600 + 8 * noise, 3)) AS power_w,
    price AS usd_per_gpu_hour,
    price / 3600 AS cost_usd,
    price / 3600 * (1 - util) AS idle_cost_usd,
    toUInt8(NOT unallocated) AS allocated,
    toUInt8(NOT unallocated AND util < 0.05) AS idle,
    0 AS price_missing,
    toNullable(toFloat32(round(util * (0.8 + (cityHash64('sm', gpu, s) % 100) / 1000), 4)))
        AS sm_active,
    if(unallocated, '', ['llama-3-8b', 'llama-3-70b', 'mistral-7b', ''][1 + job_hash % 4])
        AS model,
    if(unallocated, '', ['prod', 'staging', 'dev'][1 + job_hash % 3]) AS environment
FROM numbers({gpus:UInt32} * {secs:UInt32})
"""


def test_a_fleets_cost_facts_take_under_eight_bytes_a_row_on_disk(db: Client) -> None:
    db.command(SYNTHETIC_FLEET, parameters={"gpus": 64, "secs": 4096})
    db.command("OPTIMIZE TABLE gpuledger.cost_facts FINAL")
    rows, size = db.query(
        "SELECT sum(rows), sum(bytes_on_disk) FROM system.parts "
        "WHERE database = 'gpuledger' AND table = 'cost_facts' AND active"
    ).result_rows[0]
    assert rows == 64 * 4096
    assert size / rows <= 8.0, f"{size / rows:.2f} bytes/row"
    # The rollups saw the same GPU time.
    assert db.query("SELECT sum(gpu_seconds), sum(rows) FROM gpuledger.cost_hour").result_rows == [
        (approx(64 * 4096), 64 * 4096)
    ]


def test_sm_activity_reaches_job_costs_effective_cost_and_the_funnel(db: Client) -> None:
    """A tiny-kernel job (busy 99 %, SM activity 3-5 %) and a job on a GPU without GPM.

    Every row is 600 s at 3.6 $/h = $0.60. Worked by hand:
    - spin: g1 at util 0.99 with sm 0.03 and 0.05 (a third row, sm 0.5, stored then cancelled);
      mean_util_sm 0.99, mean_sm_active (0.03 + 0.05) / 2 = 0.04;
    - old: g2, util 0.5, no GPM (sm NULL): mean_sm_active NULL.
    Project "feature": spend 1.80, both jobs succeeded; resource_utilization
    (0.99 * 1200 + 0.5 * 600) / 1800; sm_utilization 0.04 (GPM rows only), so
    effective_cost_sm_usd 1.80 / 0.04 = 45. Funnel: every row active (busy time above 0.05);
    effective $ = 0.6 * 0.03 + 0.6 * 0.05 + 0.6 * 0.5 (SM activity where measured, else busy).
    """
    common: dict[str, Any] = {"team": "search", "project": "feature", "job_type": "training"}
    cancelled = fact(DAY1 + 2 * TEN_MIN, "g1", "spin", util=0.99, sm=0.5, **common)
    insert_facts(
        db,
        [
            fact(DAY1, "g1", "spin", util=0.99, sm=0.03, **common),
            fact(DAY1 + TEN_MIN, "g1", "spin", util=0.99, sm=0.05, **common),
            cancelled,
            fact(DAY1, "g2", "old", util=0.5, **common),
        ],
    )
    insert_facts(db, [negated(cancelled)])
    for job in ("spin", "old"):
        insert_job(db, job, "succeeded", team="search", project="feature", ended_at=DAY1 + TEN_MIN)
    jobs = by(query(db, "SELECT * FROM gpuledger.job_costs"), "job_id")
    assert jobs["spin"]["cost_usd"] == approx(1.2)
    assert jobs["spin"]["mean_util_sm"] == approx(0.99)
    assert jobs["spin"]["mean_sm_active"] == approx(0.04)
    assert jobs["old"]["mean_util_sm"] == approx(0.5) and jobs["old"]["mean_sm_active"] is None

    (feature,) = query(db, "SELECT * FROM gpuledger.project_effective_cost")
    assert feature["total_spend_usd"] == approx(1.8)
    assert feature["resource_utilization"] == approx((0.99 * 1200 + 0.5 * 600) / 1800)
    assert feature["sm_utilization"] == approx(0.04)
    assert feature["effective_cost_sm_usd"] == approx(1.8 / 0.04)
    assert feature["effective_cost_usd"] == approx(1.8 / feature["resource_utilization"])
    (weekly,) = query(db, "SELECT * FROM gpuledger.project_effective_cost_weekly")
    assert weekly["effective_cost_sm_usd"] == approx(45.0)

    funnel = query(
        db,
        "SELECT sum(total_usd) AS total, sum(active_usd) AS active, "
        "sum(effective_usd) AS effective, sum(effective_gpu_hours) AS hours "
        "FROM gpuledger.fleet_funnel_daily(start = '2026-03-01', end = '2026-03-04')",
    )[0]
    assert funnel["total"] == approx(1.8) and funnel["active"] == approx(1.8)
    assert funnel["effective"] == approx(0.6 * 0.03 + 0.6 * 0.05 + 0.6 * 0.5)
    assert funnel["hours"] == approx(600 * (0.03 + 0.05 + 0.5) / 3600)


def test_the_tags_migration_runs_again_after_a_run_cut_short_and_keys_the_rollup(
    db: Client,
) -> None:
    tags = next(m for m in available() if m.filename == "077_model_environment.sql")
    for statement in tags.statements():  # a run cut short re-runs the whole file
        db.command(statement)
    rows = [
        fact(DAY1, gpu, "serve", team="search", project="chat", util=0.5)[:-2] + tags
        for gpu, tags in (("g1", ["llama-3-70b", "prod"]), ("g2", ["llama-3-8b", "dev"]))
    ]
    insert_facts(db, rows)
    cells = db.query(
        "SELECT gpu_uuid, model, environment, sum(cost_usd) FROM gpuledger.cost_job_gpu_hour "
        "GROUP BY gpu_uuid, model, environment ORDER BY gpu_uuid"
    ).result_rows
    assert cells == [
        ("g1", "llama-3-70b", "prod", approx(0.6)),
        ("g2", "llama-3-8b", "dev", approx(0.6)),
    ]
