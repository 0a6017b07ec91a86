"""The commands' default windows find the data the store holds (a replayed or backfilled
period, weeks before the wall clock), and an empty window says what the store does hold."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from tests.support import run_gpuledger, scalar

pytestmark = pytest.mark.e2e


def gpuledger(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_gpuledger(*args, env=dict(os.environ, GPULEDGER_STORE=store, COLUMNS="80"))


def test_the_default_report_window_ends_at_the_newest_fact(
    seeded_url: str, seeded: Client, tmp_path: Path
) -> None:
    done = gpuledger(seeded_url, "report", "--out", str(tmp_path / "r.html"))
    assert done.returncode == 0, done.stderr
    # Seven days back from the newest fact's end, summed here straight from the facts.
    expected = scalar(
        seeded,
        """WITH (SELECT max(ts + toIntervalMillisecond(toUInt64(duration_s * 1000)))
                 FROM gpuledger.cost_facts) AS now_
           SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts
           WHERE ts >= now_ - INTERVAL 7 DAY AND ts < now_""",
    )
    assert expected > 0
    spend = re.search(r"spend \$([\d,.]+)", done.stdout)
    assert spend is not None, done.stdout
    assert float(spend.group(1).replace(",", "")) == pytest.approx(expected, abs=0.005)
    assert "No data" not in done.stderr


def test_recommend_and_alerts_look_back_from_the_newest_fact(seeded_url: str) -> None:
    done = gpuledger(seeded_url, "recommend", "-f", "json")
    assert done.returncode == 0, done.stderr
    assert strict_json(done.stdout), "the seeded fleet's waste is found in the default window"
    for command in (["alerts", "--since", "30d"], ["budgets", "show"]):
        done = gpuledger(seeded_url, *command, "-f", "json")
        assert done.returncode == 0, done.stderr
        assert isinstance(strict_json(done.stdout), list)


def strict_json(text: str) -> Any:
    """JSON as a strict parser reads it: NaN and Infinity are errors."""

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_an_empty_window_says_what_the_store_holds(seeded_url: str, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    done = gpuledger(
        seeded_url, "report", "--from", "2026-10-01", "--to", "2026-10-08", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert "No data in 2026-10-01 to 2026-10-08: the store holds facts from 2026-11-02" in (
        done.stderr
    )
    assert "the store holds facts from 2026-11-02" in out.read_text()


def test_one_m_is_refused_as_ambiguous(seeded_url: str, tmp_path: Path) -> None:
    done = gpuledger(seeded_url, "report", "--period", "1m", "--out", str(tmp_path / "r.html"))
    assert done.returncode == 2
    assert "1min" in done.stderr and "1mo" in done.stderr


def test_out_dash_writes_to_standard_output(seeded_url: str) -> None:
    done = gpuledger(seeded_url, "report", "--out", "-")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("<!DOCTYPE html>") and "wrote - for" in done.stderr
    done = gpuledger(seeded_url, "export", "focus", "--period", "30d", "--out", "-")
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header.startswith("AvailabilityZone,") or "BilledCost" in header
    assert lines, "the seeded month has charges"


def test_settings_fit_80_columns_with_every_variable_whole(seeded_url: str) -> None:
    from gpuledger.settings import Settings

    done = gpuledger(seeded_url, "settings")
    assert done.returncode == 0, done.stderr
    assert all(len(line) <= 80 for line in done.stdout.splitlines())
    for name in Settings.model_fields:
        assert f"GPULEDGER_{name.upper()}," in done.stdout


def test_recommend_says_why_it_found_nothing(seeded_url: str, seeded: Client) -> None:
    profiles = scalar(
        seeded,
        """SELECT count() FROM gpuledger.job_resource_profile(
               start = '2026-11-10 00:00:00', end = '2026-11-11 00:00:00')""",
    )
    done = gpuledger(
        seeded_url,
        "recommend",
        "--from", "2026-11-10", "--to", "2026-11-11", "--min-gpu-hours", "1000",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        f"nothing to recommend: judged 0 of {profiles} job profiles; set aside: {profiles} "
        "under 1000 GPU-hour(s) in the window"
    ) in done.stderr
