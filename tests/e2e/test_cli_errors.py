"""The command line as a new user meets it: failures are one line with their fix, `query` is
read-only unless told otherwise, and its JSON is strict."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from gpuledger.schema.migrate import migrate
from tests.support import ROOT, run_gpuledger

pytestmark = pytest.mark.e2e

UNREACHABLE = "clickhouse://127.0.0.1:1/gpuledger"


def gpuledger(
    *args: str, store: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    run_env = dict(os.environ, GPULEDGER_STORE=store, COLUMNS="80", **(env or {}))
    run_env.pop("GPULEDGER_DEBUG", None)
    return run_gpuledger(*args, env=run_env, stdin=stdin, timeout_s=120)


def one_line_failure(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["query", "SELECT 1"],
        ["alerts"],
        ["report", "--period", "7d", "--out", "{tmp}/r.html"],
        ["recommend"],
        ["db", "migrate"],
        ["budgets", "show"],
    ],
)
def test_an_unreachable_store_is_one_line_naming_the_setting(
    command: list[str], tmp_path: Path
) -> None:
    done = gpuledger(*(a.format(tmp=tmp_path) for a in command), store=UNREACHABLE)
    one_line_failure(done, 3, "cannot reach the ClickHouse store", "GPULEDGER_STORE")


@pytest.mark.parametrize(
    "command",
    [
        ["report", "--period", "7d", "--out", "{tmp}/r.html"],
        ["recommend"],
        ["export", "focus", "--from", "2026-11-01", "--to", "2026-12-01", "--out", "{tmp}/f.csv"],
        ["budgets", "show"],
        ["query", "SELECT count() FROM gpuledger.cost_facts"],
    ],
)
def test_a_store_never_migrated_says_to_migrate(
    command: list[str], store_url: str, tmp_path: Path
) -> None:
    done = gpuledger(*(a.format(tmp=tmp_path) for a in command), store=store_url)
    one_line_failure(done, 3, "gpuledger db migrate")


def test_kubernetes_without_a_kubeconfig_is_one_line(tmp_path: Path) -> None:
    env = {"KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path)}
    done = gpuledger("k8s", "watch", store=UNREACHABLE, env=env)
    one_line_failure(done, 3, "Kubernetes", "KUBECONFIG")


def test_query_is_read_only_unless_told_to_write(store_url: str, ch: Client) -> None:
    migrate(ch)
    done = gpuledger("query", "DROP TABLE gpuledger.budgets", store=store_url)
    assert done.returncode == 1
    assert "--write" in done.stderr and "Traceback" not in done.stderr
    assert ch.command("EXISTS TABLE gpuledger.budgets") == 1
    create = "CREATE TABLE gpuledger.scratch (a UInt8) ENGINE = Memory"
    done = gpuledger("query", "--write", create, store=store_url)
    assert done.returncode == 0, done.stderr
    assert ch.command("EXISTS TABLE gpuledger.scratch") == 1


def test_query_json_is_strict_with_zoned_times_and_no_float_noise(store_url: str) -> None:
    sql = (
        "SELECT nan AS n, -inf AS i, 0.1 + 0.2 AS noisy, 1.375000000000001 AS sum_noise, "
        "toDateTime64('2026-11-02 00:40:00', 3, 'UTC') AS t, NULL AS nothing"
    )
    done = gpuledger("query", "-f", "json", sql, store=store_url)
    assert done.returncode == 0, done.stderr

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    (row,) = json.loads(done.stdout, parse_constant=refuse)
    assert row == {
        "n": None,
        "i": None,
        "noisy": 0.3,
        "sum_noise": 1.375,
        "t": "2026-11-02T00:40:00Z",
        "nothing": None,
    }
    csv_out = gpuledger("query", "-f", "csv", sql, store=store_url).stdout.splitlines()
    assert csv_out == ["n,i,noisy,sum_noise,t,nothing", ",,0.3,1.375,2026-11-02T00:40:00Z,"]


def test_query_reads_sql_from_standard_input_and_files(store_url: str, tmp_path: Path) -> None:
    done = gpuledger("query", "-f", "csv", "-", store=store_url, stdin="SELECT 41 + 1 AS x\n")
    assert done.stdout.splitlines() == ["x", "42"], done.stderr
    sql_file = tmp_path / "q.sql"
    sql_file.write_text("SELECT 'from a file' AS origin")
    done = gpuledger("query", "-f", "csv", "--file", str(sql_file), store=store_url)
    assert done.stdout.splitlines() == ["origin", "from a file"], done.stderr
    done = gpuledger("query", store=store_url)
    assert done.returncode == 2 and "--file" in done.stderr


def test_a_query_error_quotes_the_users_sql_only(store_url: str) -> None:
    done = gpuledger("query", "SELECT x FROMM nowhere", store=store_url)
    assert done.returncode == 1
    assert "SYNTAX_ERROR" in done.stderr
    for leak in ("FORMAT Native", "for url", "127.0.0.1", "Traceback"):
        assert leak not in done.stderr, done.stderr


def test_a_relative_chdb_folder_is_refused_with_the_absolute_one(tmp_path: Path) -> None:
    done = run_gpuledger(
        "--store", "chdb://ledger/x", "query", "SELECT 1",
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
    )  # fmt: skip
    one_line_failure(done, 2, "relative folder", f"chdb://{tmp_path.resolve()}/ledger/x")
    assert not (tmp_path / "ledger").exists()


def test_mlflow_sync_without_a_tracking_server_refuses_instead_of_a_local_file(
    store_url: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = run_gpuledger(
        "--store", store_url, "mlflow", "sync", env={**env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path
    )
    one_line_failure(done, 2, "MLFLOW_TRACKING_URI")
    assert not list(tmp_path.glob("mlflow*"))
