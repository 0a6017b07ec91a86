"""The store door's decisions, as pure functions: credentials, Host names, SQL."""

from __future__ import annotations

import base64

import pytest

from gpuledger.store.door import Door, is_loopback, request_credentials, sql_refusal

DOOR = Door(password="s3cret", listen_host="127.0.0.1", port=8123)


def basic(text: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}


def test_credentials_come_from_basic_auth_or_clickhouse_headers() -> None:
    assert request_credentials(basic("default:s3cret")) == ("default", "s3cret")
    assert request_credentials(basic("default:a:b")) == ("default", "a:b")
    assert request_credentials({"X-ClickHouse-User": "u", "X-ClickHouse-Key": "k"}) == ("u", "k")
    assert request_credentials({"X-ClickHouse-Key": "k"}) == ("default", "k")
    assert request_credentials(basic("no-colon")) == (None, None)
    assert request_credentials({"Authorization": "Basic %%%"}) == (None, None)
    assert request_credentials({}) == (None, None)


def test_the_door_admits_its_user_and_password_only() -> None:
    assert DOOR.admits("default", "s3cret")
    assert not DOOR.admits("default", "s3cre")
    assert not DOOR.admits("default", "s3cret ")
    assert not DOOR.admits("admin", "s3cret")
    assert not DOOR.admits(None, None)
    assert not Door(password="", listen_host="127.0.0.1", port=1).admits("default", "x")


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        ("127.0.0.1:8123", True),
        ("localhost:8123", True),
        ("LOCALHOST:8123", True),
        ("[::1]:8123", True),
        ("127.0.0.1", True),
        ("127.0.0.1:8124", False),
        ("evil.example:8123", False),
        ("127.0.0.1.evil.example:8123", False),
        ("localhost:8123@evil", False),
        ("", False),
        (None, False),
    ],
)
def test_the_host_header_must_name_the_loopback_address(header: str | None, allowed: bool) -> None:
    assert DOOR.host_allowed(header) is allowed


def test_a_configured_address_counts_and_a_wildcard_leaves_it_to_the_password() -> None:
    door = Door(password="p", listen_host="10.1.2.3", port=9000)
    assert door.host_allowed("10.1.2.3:9000") and door.host_allowed("localhost:9000")
    assert not door.host_allowed("10.1.2.4:9000")
    assert Door(password="p", listen_host="0.0.0.0", port=9000).host_allowed("anything:1")


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com", ""]))


@pytest.mark.parametrize(
    "canonical",
    [
        "SELECT *\nFROM file('/etc/passwd')",
        "SELECT *\nFROM FILE('/etc/passwd')",
        "SELECT *\nFROM `file`('/etc/passwd')",
        "SELECT *\nFROM s3Cluster('c', 'http://x')",
        "SELECT *\nFROM icebergLocal('/x')",
        "SELECT *\nFROM `/etc/passwd`",
        "SELECT *\nFROM default.`../x.csv`",
        "SELECT 1\nINTO OUTFILE 'x'",
        "INSERT INTO t FROM INFILE '/etc/passwd' FORMAT TSV",
        "CREATE DATABASE d\nENGINE = Filesystem",
        "CREATE TABLE t\n(\n    `a` Int8\n)\nENGINE = Executable('x', 'TSV')",
        "SET format_schema = 'x:M'",
        "SYSTEM SHUTDOWN",
        "ATTACH TABLE t FROM '/x' (a Int8) ENGINE = MergeTree ORDER BY a",
    ],
)
def test_sql_that_reaches_outside_is_refused(canonical: str) -> None:
    assert sql_refusal(canonical) is not None


@pytest.mark.parametrize(
    "canonical",
    [
        "SELECT url, file, remote\nFROM gpuledger.links\nWHERE file LIKE '%file(%'",
        "SELECT *\nFROM numbers(10)",
        "INSERT INTO gpuledger.cost_facts (ts, cost_usd) FORMAT Native",
        "SELECT 'INTO OUTFILE \\'x\\''",
        "SELECT *\nFROM gpuledger.job_resource_profile(start = '2026-11-01', end = '2026-12-01')",
        "CREATE TABLE t\n(\n    `a` Int8\n)\nENGINE = MergeTree\nORDER BY a",
        "CREATE TABLE t\n(\n    `a` Int8,\n    `b` Int8 MATERIALIZED (a * 2)\n)\nENGINE = Log",
    ],
)
def test_ordinary_sql_is_served(canonical: str) -> None:
    assert sql_refusal(canonical) is None
