"""A store URL's password never reaches the console, and its database is `gpuledger` or
refused (every table, view and panel names that database)."""

from __future__ import annotations

import subprocess

import pytest

from gpuledger.grafana.provisioning import ClickHouseEndpoint, ProvisioningError
from gpuledger.settings import Settings
from gpuledger.store import parse_store_url, redact_store_url
from gpuledger.up import store_line
from tests.support import run_gpuledger

SECRET = "hunter2-s3cret"


def gpuledger(*args: str, store: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "300", "HOME": "/nonexistent"}
    return run_gpuledger("--store", store, *args, env=env, timeout_s=60)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"clickhouse://gpuledger:{SECRET}@ch.internal:8123/gpuledger",
            "clickhouse://gpuledger:***@ch.internal:8123/gpuledger",
        ),
        (f"clickhouses://u:{SECRET}@ch:8443", "clickhouses://u:***@ch:8443"),
        (f"clickhouse://u:p%40{SECRET}@ch/gpuledger", "clickhouse://u:***@ch/gpuledger"),
        (
            f"clickhouse://u@ch/gpuledger?password={SECRET}&max_threads=2",
            "clickhouse://u@ch/gpuledger?password=***&max_threads=2",
        ),
        ("clickhouse://u@ch:8123/gpuledger", "clickhouse://u@ch:8123/gpuledger"),
        ("chdb:///var/lib/gpuledger/store", "chdb:///var/lib/gpuledger/store"),
    ],
)
def test_a_store_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_store_url(url) == shown


def test_up_names_the_store_without_its_password() -> None:
    settings = Settings(store=f"clickhouse://gpuledger:{SECRET}@ch.internal:8123/gpuledger")
    line = store_line(settings, 3)
    assert SECRET not in line
    assert (
        line
        == "store    clickhouse://gpuledger:***@ch.internal:8123/gpuledger (3 migrations applied)"
    )


@pytest.mark.e2e
def test_settings_lists_the_store_without_its_password() -> None:
    done = gpuledger("settings", store=f"clickhouse://gpuledger:{SECRET}@ch.internal/gpuledger")
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert "clickhouse://gpuledger:***@ch.internal/gpuledger" in done.stdout


@pytest.mark.e2e
def test_a_store_that_cannot_be_reached_is_reported_without_the_password() -> None:
    # Port 9 (discard) on the loopback: nothing answers.
    done = gpuledger("query", "SELECT 1", store=f"clickhouse://u:{SECRET}@127.0.0.1:9/gpuledger")
    assert done.returncode != 0
    assert SECRET not in done.stdout + done.stderr


@pytest.mark.e2e
def test_a_database_other_than_gpuledger_is_refused_in_one_line() -> None:
    done = gpuledger("query", "SELECT 1", store=f"clickhouse://u:{SECRET}@127.0.0.1:9/analytics")
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "names database 'analytics'" in lines[0] and "/gpuledger" in lines[0]
    assert SECRET not in done.stdout + done.stderr


def test_the_database_is_gpuledger_when_the_url_names_none_or_names_it() -> None:
    assert parse_store_url("clickhouse://u:p@ch:8123").database == "gpuledger"
    assert parse_store_url("clickhouse://u:p@ch:8123/gpuledger").database == "gpuledger"
    with pytest.raises(ValueError, match="names database 'other'"):
        parse_store_url("clickhouse://u:p@ch:8123/other")


def test_grafana_data_source_refuses_another_database_without_showing_the_password() -> None:
    with pytest.raises(ProvisioningError) as refused:
        ClickHouseEndpoint.from_url(f"clickhouse://u:{SECRET}@ch:8123/other")
    assert "names database 'other'" in str(refused.value)
    assert SECRET not in str(refused.value)
    assert ClickHouseEndpoint.from_url("clickhouse://u:p@ch:8123").database == "gpuledger"
