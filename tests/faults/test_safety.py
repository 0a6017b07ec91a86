"""The read-only analyst user for a ClickHouse server: its statements parse on the real engine,
and the script that makes it keeps the password out of everything but a SHA-256."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from gpuledger.schema.migrate import split_statements

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "clickhouse" / "create_analyst_user.sh"


def dry_run(tmp_path: Path, password: str, **env: str) -> subprocess.CompletedProcess[str]:
    secret = tmp_path / "analyst_password"
    secret.write_text(password + "\n")
    return subprocess.run(
        [str(SCRIPT), "--dry-run"],
        env={**os.environ, "GPULEDGER_ANALYST_PASSWORD_FILE": str(secret), **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_analyst_users_statements_parse_on_the_real_engine(ch: Client, tmp_path: Path) -> None:
    password = "correct horse battery staple"
    done = dry_run(tmp_path, password)
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout
    assert hashlib.sha256(password.encode()).hexdigest() in done.stdout
    statements = split_statements(done.stdout)
    assert [s.split()[0] for s in statements] == [
        "CREATE", "CREATE", "GRANT", "CREATE", "GRANT", "ALTER",
    ]  # fmt: skip
    for statement in statements:
        formatted = ch.query("SELECT formatQuery({q:String})", parameters={"q": statement})
        assert formatted.result_rows[0][0], statement
    assert "GRANT SELECT ON gpuledger.* TO gpuledger_reader" in statements
    assert any("readonly = 2" in s for s in statements)


def test_the_script_refuses_a_short_password_and_an_odd_user_name(tmp_path: Path) -> None:
    short = dry_run(tmp_path, "hunter2")
    assert short.returncode == 2 and "shorter than 12 characters" in short.stderr
    odd = dry_run(tmp_path, "a long enough password", GPULEDGER_ANALYST_USER="x; DROP USER y")
    assert odd.returncode == 2 and "letters, digits and _" in odd.stderr
