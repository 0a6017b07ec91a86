"""Alerts in the store as SREs meet them: the alerts table and view, the live board,
`gpuledger alerts` and `gpuledger budgets` (real chdb store behind clickhouse-connect)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from clickhouse_connect.driver.client import Client
from rich.console import Console

from gpuledger.alerts_cli import parse_since
from gpuledger.board import Board
from gpuledger.ledger.budgets import Budget, SpendRow, decide
from gpuledger.ledger.facts import FactBatch
from gpuledger.ledger.idle import IdleTracker
from gpuledger.ledger.orphans import OrphanTracker
from gpuledger.schema.messages import AlertKind, ProcessSample
from gpuledger.schema.migrate import migrate
from gpuledger.streams.alert_store import (
    AlertStore,
    gpu_ends_that_may_idle,
    idle_tail,
    latest_fact_end,
)
from gpuledger.streams.alerting import REBUILD_LOOKBACK_S
from gpuledger.streams.budgets import active_budgets, store_budgets
from gpuledger.streams.sink import FactSink
from tests.alerts.test_idle_episodes import POLICY, T0, busy_for, idle_for, states
from tests.support import ROOT, gpu_sample

pytestmark = pytest.mark.integration


@pytest.fixture
def db(ch: Client) -> Client:
    migrate(ch)
    return ch


def gpuledger(store_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuledger.cli", "--store", store_url, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(ROOT)},
    )


def idle_gpu_story(db: Client) -> None:
    """GPU-board idles 700 s and fires; GPU-back idles 700 s, then works and resolves."""
    facts = idle_for(0, 700, gpu="GPU-board") + idle_for(0, 700, gpu="GPU-back", job="job-2")
    facts += busy_for(700, 800, gpu="GPU-back", job="job-2")
    FactSink(db).insert_facts(FactBatch.of(facts))
    AlertStore(db).insert(IdleTracker(POLICY).observe(facts))


def test_the_board_lists_the_idle_gpu_that_fires(db: Client) -> None:
    idle_gpu_story(db)
    console = Console(record=True, width=200)
    console.print(Board(db).render())
    text = console.export_text()
    assert "alerts firing 1" in text
    # Every fact of the story is a job's: the funnel line shows all of it allocated.
    total = db.query("SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts").result_rows[0][0]
    assert f"funnel ${total:,.2f} total → ${total:,.2f} allocated" in text
    assert "Alerts firing" in text and "node-1 GPU-board" in text
    assert "job-1" in text and "10 min" in text and "0.66" in text
    assert "computing nothing since 2026-01-01 00:00 UTC" in text
    assert "GPU-back" not in text.split("Alerts firing")[1].split("Top teams")[0]


def test_the_board_and_the_alerts_command_show_orphaned_gpu_memory(
    db: Client, store_url: str
) -> None:
    samples = [
        gpu_sample("GPU-orph", T0 + 60 * i, interval_s=60.0, processes=[
            ProcessSample(pid=31, name="jupyter", mem_used_bytes=3 * 1024**3)
        ])
        for i in range(16)
    ]  # fmt: skip
    events = OrphanTracker(900).observe(samples, {}, lambda gpu, t: None, {"GPU-orph": 2.0})
    AlertStore(db).insert(events)
    FactSink(db).insert_facts(
        FactBatch.of(idle_for(0, 60))
    )  # the board shows alerts beside the fleet
    console = Console(record=True, width=200)
    console.print(Board(db).render())
    text = console.export_text().split("Alerts firing")[1]
    assert "ORPHAN" in text and "15 min" in text and "0.50" in text
    assert "process 31 (jupyter) holds 3.0 GiB of GPU memory with no job" in text
    listed = gpuledger(store_url, "alerts", "--kind", "orphaned_gpu_memory", "-f", "json")
    assert listed.returncode == 0, listed.stderr
    (alert,) = json.loads(listed.stdout)
    assert (alert["rule"], alert["state"], alert["wasted_usd"]) == ("pid 31", "firing", 0.5)


def test_an_alert_batch_stored_twice_is_stored_once(db: Client) -> None:
    events = IdleTracker(POLICY).observe(idle_for(0, 601))
    store = AlertStore(db)
    store.insert(events)
    store.insert(events)  # a retry after a timeout that had in fact succeeded
    assert db.query("SELECT count() FROM gpuledger.alerts").result_rows == [(1,)]
    (latest,) = store.latest(["idle_allocated_gpu"], firing_only=True)
    assert latest.alert == events[0].alert and latest.fired_at == T0 + 600


def test_budget_alerts_of_two_teams_and_rules_fire_side_by_side(db: Client) -> None:
    now = T0 + 20 * 86400
    budgets = [Budget("*", "research", "", 100.0), Budget("*", "vision", "", 100.0)]
    spend = [SpendRow("research", "a", 90.0, 0.0), SpendRow("vision", "b", 60.0, 0.0)]
    AlertStore(db).insert(decide(budgets, spend, now, {}))
    rows = db.query("SELECT team, message FROM gpuledger.alerts_firing").result_rows
    firing = sorted(tuple(row) for row in rows)
    assert [(team, m.split(":")[0]) for team, m in firing] == [
        ("research", "team research"),
        ("research", "team research"),
        ("vision", "team vision"),
    ]
    rules = AlertStore(db).latest(["budget_burn"], firing_only=True)
    assert sorted((e.alert.team, e.rule) for e in rules) == [
        ("research", "mtd_50"),
        ("research", "mtd_80"),
        ("vision", "mtd_50"),
    ]


def test_gpuledger_alerts_lists_firing_and_recent_alerts(db: Client, store_url: str) -> None:
    idle_gpu_story(db)
    firing = gpuledger(store_url, "alerts", "--firing", "--format", "json")
    assert firing.returncode == 0, firing.stderr
    found = json.loads(firing.stdout)
    assert [(a["gpu_uuid"], a["state"], a["since"], a["fired_at"]) for a in found] == [
        ("GPU-board", "firing", "2026-01-01T00:00:00Z", "2026-01-01T00:10:00Z")
    ]
    assert "1 alert, 1 firing; idle GPUs and orphaned memory in them wasted $0.66" in firing.stderr

    table = gpuledger(store_url, "alerts")
    assert table.returncode == 0, table.stderr
    assert "GPU-back" in table.stdout and "resolved" in table.stdout
    assert "2 alerts, 1 firing" in table.stderr
    everything = json.loads(gpuledger(store_url, "alerts", "--format", "json").stdout)
    back = next(a for a in everything if a["gpu_uuid"] == "GPU-back")
    assert back["state"] == "resolved" and "busy again after 12 min idle" in back["message"]

    # Event times are of January 2026: "now" is the newest fact's end, not the wall clock,
    # so the last two hours of that data hold both alerts; a later start holds none.
    recent = gpuledger(store_url, "alerts", "--since", "2h", "--format", "csv")
    assert recent.returncode == 0, recent.stderr
    assert len(recent.stdout.strip().splitlines()) == 3
    later = gpuledger(store_url, "alerts", "--since", "2026-02-01", "--format", "csv")
    assert later.returncode == 0 and later.stdout.strip().splitlines() == [
        "ts,kind,rule,state,gpu_uuid,node,job_id,team,project,since,idle_seconds,wasted_usd,"
        "message,fired_at"
    ]
    bad = gpuledger(store_url, "alerts", "--since", "yesterday")
    assert bad.returncode == 2 and "give a duration (30min, 2h, 7d)" in bad.stderr


def test_since_takes_durations_epochs_and_iso_times() -> None:
    assert parse_since("90min", now=10_000.0) == 10_000.0 - 5400
    with pytest.raises(typer.BadParameter, match="ambiguous"):
        parse_since("90m", now=10_000.0)
    assert parse_since("1767225600") == T0
    assert parse_since("2026-01-01T00:00:00Z") == T0
    assert parse_since("2026-01-01 00:00") == T0


def test_budgets_load_writes_the_file_and_replace_removes_what_it_lacks(
    db: Client, store_url: str, tmp_path: Path
) -> None:
    first = tmp_path / "q1.csv"
    first.write_text("month,team,project,budget_usd\n*,research,,5000\n2026-01,vision,,800\n")
    loaded = gpuledger(store_url, "budgets", "load", str(first))
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded 2 budgets ($5,800.00 in all)" in loaded.stdout
    second = tmp_path / "q2.csv"
    second.write_text("month,team,project,budget_usd\n*,research,,6000\n")
    replaced = gpuledger(store_url, "budgets", "load", "--replace", str(second))
    assert replaced.returncode == 0, replaced.stderr
    assert "removed 1 not in the file" in replaced.stdout
    assert active_budgets(db) == [Budget("*", "research", "", 6000.0)]

    bad = tmp_path / "bad.csv"
    bad.write_text("month,team,project,budget_usd\n2026-1,research,,10\n")
    refused = gpuledger(store_url, "budgets", "load", str(bad))
    assert refused.returncode == 2
    assert "bad.csv line 2: month must be YYYY-MM or *, got '2026-1'" in refused.stderr


def test_budgets_show_says_what_each_budget_has_spent(db: Client, store_url: str) -> None:
    store_budgets(db, [Budget("*", "vision", "", 1.0)], source="t", replace=False, now=T0)
    FactSink(db).insert_facts(FactBatch.of(busy_for(0, 600, team="vision")))  # $0.67 in ten minutes
    shown = gpuledger(store_url, "budgets", "show", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    (row,) = json.loads(shown.stdout)
    expected: dict[str, Any] = {"month": "2026-01", "team": "vision", "budget_usd": 1.0}
    assert {k: row[k] for k in expected} == expected
    assert row["month_to_date_usd"] == pytest.approx(4.0 * 600 / 3600)
    assert row["used_pct"] == pytest.approx(66.7)


def restored(db: Client, idle_below: float | None) -> tuple[set[str], list[Any], list[Any]]:
    """A restarted worker's idle tracker: the GPUs it replayed, the alerts it owes and the
    episodes firing after the replay."""
    tracker = IdleTracker(POLICY)
    last = latest_fact_end(db)
    assert last is not None
    lookback = last - max(REBUILD_LOOKBACK_S, POLICY.horizon_s())
    latest = AlertStore(db).latest([AlertKind.idle_allocated_gpu.value], since=lookback)
    tail, gaps = idle_tail(
        db, POLICY, latest, lookback=lookback, job_types={}, idle_below=idle_below
    )
    owed = tracker.restore(latest=latest, gaps=gaps, tail=tail, recorded=set())
    return {f.gpu_uuid for f in tail}, sorted(states(owed)), sorted(states(tracker.firing()))


def test_a_restarted_worker_replays_only_the_gpus_that_may_have_an_idle_episode(
    db: Client,
) -> None:
    facts = busy_for(0, 1200, gpu="GPU-busy")
    facts += idle_for(0, 100, gpu="GPU-long-ago") + busy_for(100, 1500, gpu="GPU-long-ago")
    facts += busy_for(0, 1000, gpu="GPU-idles") + idle_for(1000, 1700, gpu="GPU-idles")
    facts += idle_for(0, 700, gpu="GPU-unallocated", job="")
    facts += idle_for(0, 650, gpu="GPU-fires", job="job-f") + busy_for(
        650, 680, gpu="GPU-fires", job="job-f"
    )
    FactSink(db).insert_facts(FactBatch.of(facts))
    AlertStore(db).insert(IdleTracker(POLICY).observe(facts))

    ends = gpu_ends_that_may_idle(db, T0, POLICY.horizon_s(), 0.05, keep=["GPU-busy"])
    assert ends == {"GPU-idles": T0 + 1700, "GPU-fires": T0 + 680, "GPU-busy": T0 + 1200}

    everything = restored(db, idle_below=None)
    candidates = restored(db, idle_below=0.05)
    assert everything[0] == {
        "GPU-busy", "GPU-long-ago", "GPU-idles", "GPU-unallocated", "GPU-fires"
    }  # fmt: skip
    assert candidates[0] == {"GPU-idles", "GPU-fires"}
    # The same episodes and the same alerts owed, from a fraction of the facts.
    assert candidates[1:] == everything[1:]
    assert [gpu for gpu, state, _ in candidates[2] if state == "firing"] == [
        "GPU-fires",
        "GPU-idles",
    ]
