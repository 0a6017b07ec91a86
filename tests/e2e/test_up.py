"""A new user's first minutes: `gpuledger up` on embedded defaults, then `gpuledger query`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import run_gpuledger

pytestmark = pytest.mark.e2e


def gpuledger(
    *args: str, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return run_gpuledger(*args, env=env, timeout_s=timeout)


def processes_with_env(entry: str) -> list[str]:
    found = []
    needle = entry.encode() + b"\0"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in environ and not cmdline.startswith(("pgrep", "ps ")):
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_up_for_a_bounded_time_leaves_facts_that_query_reads(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEDGER_")}
    env["GPULEDGER_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONUNBUFFERED"] = "1"

    up = gpuledger("up", "--duration", "25", "--no-board", env=env)
    assert up.returncode == 0, up.stderr[-4000:]
    assert "stopped: no gpuledger process left running" in up.stderr

    # Nothing of ours is left running: every part `up` started carries our data folder in
    # its environment (broker, store, worker, agent).
    assert processes_with_env(f"GPULEDGER_DATA_DIR={env['GPULEDGER_DATA_DIR']}") == []

    query = gpuledger(
        "query",
        "SELECT team, sum(cost_usd * sign) AS usd, count() AS n FROM gpuledger.cost_facts "
        "GROUP BY team ORDER BY team",
        "--format",
        "json",
        env=env,
    )
    assert query.returncode == 0, query.stderr[-4000:]
    teams = {row["team"]: row for row in json.loads(query.stdout)}
    allocated = {t: r for t, r in teams.items() if t}
    assert allocated, f"no team was charged: {teams}"
    assert all(float(r["usd"]) > 0 for r in allocated.values())

    jobs = gpuledger(
        "query", "SELECT job_id, cost_usd FROM gpuledger.job_costs", "--format", "csv", env=env
    )
    assert jobs.returncode == 0, jobs.stderr[-4000:]
    lines = jobs.stdout.strip().splitlines()
    assert lines[0] == "job_id,cost_usd" and len(lines) > 2
