"""Queries: the live board's queries (gpuledger/board.py) and the analyst
views over the largest fact table this machine builds in reasonable time, with and without
the rollups, through clickhouse-connect and the embedded store as the board and `gpuledger
query` run them.

The table: 100 s of a 10,000-GPU fleet made by the worker's own code (bench/_facts.py), then
copied forward in time in SQL until it holds about 100 M rows (the same fleet over about
2.8 hours); the rollups fill through their materialized views as the copies are inserted.
The views that 040_job_gpu_hour.sql moved onto the per (job, GPU, hour) rollup are timed
against the fact scans they replaced (created here as `<view>_scan`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench._facts import fill, replicate, table_bytes
from bench._fleet import Fleet
from bench._report import Figure, show
from bench._rig import Rig, Store
from gpuledger.analysts.sql import WINDOW_ARGS
from gpuledger.board import FIRING_SQL, GPU_SQL, LIVE_WINDOW_S, TOP_SQL, TOTAL_SQL
from gpuledger.schema.migrate import split_statements

SUMMARY = "board queries and analyst views over ~100 M fact rows, with and without rollups"
GOAL_BOARD_MS = 200.0
GOAL_VIEW_MS = 2000.0
TARGET_ROWS = 100_000_000
RUNS = 5
MAX_QUERY_S = 120

# The board's rollup queries, asked of the facts themselves.
TOP_RAW_SQL = """
SELECT {dim:Identifier} AS who, sum(cost_usd * sign) AS usd, sum(idle_cost_usd * sign) AS idle_usd
FROM gpuledger.cost_facts
WHERE allocated = 1
GROUP BY who ORDER BY usd DESC LIMIT 5
"""
TOTAL_RAW_SQL = """
SELECT sum(cost_usd * sign), sum(idle_cost_usd * sign),
       sum(toFloat64(duration_s) * share * sign), count()
FROM gpuledger.cost_facts
"""
# team_daily asked of the facts instead of cost_hour.
TEAM_DAILY_RAW_SQL = """
SELECT toDate(f.ts) AS day, f.team AS team,
       sum(toFloat64(f.duration_s) * f.share * f.sign) / 3600 AS gpu_hours,
       sum(f.cost_usd * f.sign) AS cost_usd, sum(f.idle_cost_usd * f.sign) AS idle_cost_usd,
       sumIf(f.cost_usd * f.sign, f.allocated = 1) AS allocated_cost_usd
FROM gpuledger.cost_facts AS f
GROUP BY day, team HAVING sum(f.sign) != 0
"""
VIEWS = [
    "job_costs",
    "team_daily",
    "project_effective_cost",
    "project_effective_cost_weekly",
    "inference_unit_cost",
    "idle_waste",
    "job_purpose",
]
# Parameterized views, asked over the whole table's time.
WINDOWED_VIEWS = ["focus_hourly_charges", "job_resource_profile", "gpu_hourly_demand",
                  "endpoint_hourly", "fleet_funnel", "fleet_funnel_daily"]  # fmt: skip
# The views that read cost_job_gpu_hour, as the fact scans they replaced: their baseline.
FACT_SCANS = ["job_costs", "idle_waste", "focus_hourly_charges", "job_resource_profile",
              "gpu_hourly_demand"]  # fmt: skip
FACT_SCAN_FILE = (
    Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fact_scan_views.sql"
)
ROLLUPS = ("cost_minute", "cost_hour", "cost_job_gpu_hour")


def create_fact_scans(store: Store) -> None:
    """`<view>_scan` for each view of FACT_SCANS (the tests keep their fact-scan bodies)."""
    for statement in split_statements(FACT_SCAN_FILE.read_text()):
        store.client.command(statement)


def timed(store: Store, sql: str, params: dict[str, Any] | None = None) -> tuple[float, int]:
    """(median ms of RUNS runs after one warm-up, rows returned); a query slower than 5 s is
    timed once (its first run), one slower than the store's limit counts as that limit."""
    settings = {"max_execution_time": MAX_QUERY_S}
    started = time.perf_counter()
    try:
        rows = len(store.client.query(sql, parameters=params, settings=settings).result_rows)
    except Exception as exc:  # over the time or memory limit: say so, go on
        print(f"  query failed after {time.perf_counter() - started:.0f} s: {exc}"[:300])
        return float("inf"), 0
    first = 1000 * (time.perf_counter() - started)
    if first > 5000:
        return first, rows
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        store.client.query(sql, parameters=params, settings=settings)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times), rows


def measure(store: Store, rows: int) -> list[Figure]:
    board: list[tuple[str, str, dict[str, Any] | None, str, dict[str, Any] | None]] = [
        ("live GPUs (GPU_SQL, facts of the last 10 s)",
         GPU_SQL, {"window": LIVE_WINDOW_S}, "", None),
        ("top teams (TOP_SQL)", TOP_SQL, {"dim": "team"}, TOP_RAW_SQL, {"dim": "team"}),
        ("top projects (TOP_SQL)",
         TOP_SQL, {"dim": "project"}, TOP_RAW_SQL, {"dim": "project"}),
        ("totals (TOTAL_SQL)", TOTAL_SQL, None, TOTAL_RAW_SQL, None),
        ("alerts firing (FIRING_SQL)", FIRING_SQL, None, "", None),
    ]  # fmt: skip
    size = f"{rows / 1e6:,.0f} M"
    figures: list[Figure] = []
    for name, sql, params, raw_sql, raw_params in board:
        ms, count = timed(store, sql, params)
        raw = timed(store, raw_sql, raw_params)[0] if raw_sql else None
        figures.append(_figure(f"{size} board: {name}", ms, count, GOAL_BOARD_MS, raw))
    for view in VIEWS:
        ms, count = timed(store, f"SELECT * FROM gpuledger.{view}")
        raw = None
        if view == "team_daily":
            raw = timed(store, TEAM_DAILY_RAW_SQL)[0]
        elif view in FACT_SCANS:
            raw = timed(store, f"SELECT * FROM gpuledger.{view}_scan")[0]
        figures.append(_figure(f"{size} view: {view}", ms, count, GOAL_VIEW_MS, raw))
    first, last = store.client.query(
        "SELECT min(ts), max(ts) + toIntervalSecond(1) FROM gpuledger.cost_facts"
    ).result_rows[0]
    window = {"start": first, "end": last}
    for view in WINDOWED_VIEWS:
        ms, count = timed(store, f"SELECT * FROM gpuledger.{view}({WINDOW_ARGS})", window)
        raw = None
        if view in FACT_SCANS:
            raw = timed(store, f"SELECT * FROM gpuledger.{view}_scan({WINDOW_ARGS})", window)[0]
        figures.append(_figure(f"{size} view: {view}(all)", ms, count, GOAL_VIEW_MS, raw))
    return figures


def run(quick: bool = False) -> None:
    sizes = (1_000_000, 2_000_000) if quick else (10_000_000, TARGET_ROWS)
    figures: list[Figure] = []
    notes: list[str] = []
    with Rig() as rig:
        store = rig.new_store()
        create_fact_scans(store)
        started = time.monotonic()
        ticks = 100
        filled = fill(store, Fleet(125 if quick else 1250), ticks)
        copies_done = 1
        for size in sizes:
            copies = max(copies_done, round(size / filled.facts))
            rows = replicate(store, copies, filled.span_s, since_copy=copies_done)
            copies_done = copies
            for table in ROLLUPS:
                store.client.command(f"OPTIMIZE TABLE gpuledger.{table} FINAL")
            parts = store.count(
                "SELECT count() FROM system.parts WHERE database = 'gpuledger' "
                "AND table = 'cost_facts' AND active"
            )
            _, disk, _ = table_bytes(store, "cost_facts")
            note = (
                f"{rows:,} rows: {copies} x {filled.span_s:.0f} s of {filled.gpus:,} GPUs "
                f"({disk / 1e9:.2f} GB, {parts} parts), built {time.monotonic() - started:,.0f} "
                "s from the start"
            )
            print(note, flush=True)
            notes.append(note)
            figures += measure(store, rows)
    show(
        f"Queries over up to {rows:,} cost_facts rows ({filled.gpus:,} GPUs), median of "
        f"{RUNS} runs after a warm-up (one run when slower than 5 s), ms",
        figures,
        [
            *notes,
            "'baseline' = the same answer computed from cost_facts without the rollups "
            "(for the board's rollup queries and team_daily; for the views on "
            "cost_job_gpu_hour, and the fact scans they replaced); the views are asked "
            "whole (SELECT *), the parameterized ones over the whole table's time.",
            "Every query goes through clickhouse-connect and the store's HTTP interface; the "
            f"embedded store runs one statement at a time; a query is stopped at {MAX_QUERY_S} s.",
        ],
    )


def _figure(name: str, ms: float, rows: int, goal: float, raw: float | None) -> Figure:
    return Figure(
        name,
        "over the limit" if ms == float("inf") else f"{ms:,.0f}",
        f"<= {goal:,.0f}",
        ms <= goal,
        "" if raw is None else _without_rollups(raw),
        _ratio(ms, raw),
        f"{rows:,} rows",
    )


def _without_rollups(raw: float) -> str:
    if raw == float("inf"):
        return f"over the {MAX_QUERY_S} s limit without rollups"
    return f"{raw:,.0f} without rollups"


def _ratio(ms: float, raw: float | None) -> str:
    if raw is None or ms == float("inf"):
        return ""
    if raw == float("inf"):
        return f"> {1000 * MAX_QUERY_S / ms:,.0f}x faster"
    return f"{raw / ms:.1f}x faster"
