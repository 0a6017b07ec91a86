"""`gpuledger` refuses a bad setting in one line per problem: which setting, where to set it,
what is wrong and the value given; exit status 2."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import run_gpuledger

pytestmark = pytest.mark.e2e


def gpuledger(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_gpuledger(*args, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", **(env or {})})


def test_a_bad_setting_names_the_setting_where_to_set_it_and_the_value() -> None:
    done = gpuledger("settings", env={"GPULEDGER_FACTS_COMPRESSION": "brotli"})
    assert done.returncode == 2
    assert "bad setting facts_compression (GPULEDGER_FACTS_COMPRESSION or --set " in done.stderr
    assert "'zstd', 'lz4', 'snappy', 'gzip' or 'none' (got 'brotli')" in done.stderr
    assert "errors.pydantic.dev" not in done.stderr


def test_each_bad_setting_gets_its_own_line() -> None:
    done = gpuledger("--set", "idle_threshold=abc", "--set", "alert_resend_s=-1", "settings")
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("bad setting")]
    assert [line.split()[2] for line in lines] == ["idle_threshold", "alert_resend_s"], done.stderr
    assert "(got 'abc')" in done.stderr


def test_good_settings_are_listed_with_their_values() -> None:
    done = gpuledger("--set", "facts_compression=lz4", "settings")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if "facts_compression" in line)
    assert "lz4" in row
