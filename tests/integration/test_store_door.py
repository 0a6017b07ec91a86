"""The embedded store's door, tried as a stranger would: plain HTTP without the password, a
foreign Host header, SQL that reaches files, URLs or processes (with the owner's password too),
and a store opened to the network without a password."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from gpuledger.store import (
    StoreInfo,
    connect,
    ensure_store,
    parse_store_url,
    read_secret,
    read_store_file,
    stop_owned_stores,
)
from gpuledger.store.folder import SECRET_FILE

pytestmark = pytest.mark.integration

# What only a served query prints: never part of a path, a port or a version in an error.
ANSWER = "served-to-the-owner-only"
ANSWER_SQL = f"SELECT '{ANSWER}'"

SECRET_TEXT = "the owner's private key"


def folder_of(store_url: str) -> Path:
    target = parse_store_url(store_url)
    assert target.path is not None
    return target.path


def store_info(store_url: str) -> StoreInfo:
    info = read_store_file(folder_of(store_url))
    assert info is not None
    return info


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request(
    info: StoreInfo,
    sql: str,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    path: str = "/",
) -> tuple[int, str]:
    """One plain HTTP request, as curl or a web page would send it."""
    connection = http.client.HTTPConnection(info.host, info.port, timeout=10)
    try:
        if method == "GET":
            target = f"{path}?{urlencode({'query': sql})}" if sql else path
            connection.request("GET", target, headers=headers or {})
        else:
            connection.request("POST", path, body=sql.encode(), headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.fixture
def owner(store_url: str) -> dict[str, str]:
    """The owner's credentials, read as gpuledger's clients read them."""
    return {"Authorization": basic("default", read_secret(folder_of(store_url)))}


@pytest.fixture
def secret_path(tmp_path: Path) -> Path:
    path = tmp_path / "private.txt"
    path.write_text(SECRET_TEXT + "\n")
    return path


# -- credentials ----------------------------------------------------------------------------


def test_a_request_without_the_password_gets_401(store_url: str) -> None:
    info = store_info(store_url)
    status, body = request(info, ANSWER_SQL)
    assert status == 401
    assert "Authentication failed" in body and ANSWER not in body
    status, _ = request(info, ANSWER_SQL, method="GET")
    assert status == 401


def test_a_wrong_password_or_user_gets_401(store_url: str) -> None:
    info = store_info(store_url)
    secret = read_secret(folder_of(store_url))
    for headers in (
        {"Authorization": basic("default", "guess")},
        {"Authorization": basic("default", "")},
        {"Authorization": basic("admin", secret)},
        {"Authorization": basic("default", secret[:-1])},
        {"Authorization": "Basic !!!not-base64"},
        {"X-ClickHouse-User": "default", "X-ClickHouse-Key": "guess"},
    ):
        status, body = request(info, ANSWER_SQL, headers)
        assert (status, ANSWER in body) == (401, False), headers


def test_the_owner_gets_in_with_basic_auth_or_clickhouse_headers(store_url: str) -> None:
    info = store_info(store_url)
    secret = read_secret(folder_of(store_url))
    assert request(info, ANSWER_SQL, {"Authorization": basic("default", secret)}) == (
        200,
        ANSWER + "\n",
    )
    headers = {"X-ClickHouse-User": "default", "X-ClickHouse-Key": secret}
    assert request(info, "SELECT 43", headers) == (200, "43\n")


def test_ping_needs_no_password(store_url: str) -> None:
    assert request(store_info(store_url), "", method="GET", path="/ping")[0] == 200


def test_the_secret_is_readable_by_its_owner_only(store_url: str) -> None:
    folder = folder_of(store_url)
    mode = (folder / SECRET_FILE).stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert not folder.stat().st_mode & stat.S_IWOTH
    assert len(read_secret(folder)) >= 32


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A store folder in a directory every user may enter (as a shared data folder would be)."""
    base = Path(tempfile.mkdtemp(prefix="gpuledger-door-"))
    base.chmod(0o755)
    path = base / "store"
    path.mkdir(mode=0o755)
    yield path
    stop_owned_stores(path)
    subprocess.run(["rm", "-rf", str(base)], check=False)


STRANGER = """
import http.client, json, sys
from pathlib import Path
path = Path(sys.argv[1])
try:
    (path / "store.secret").read_text()
    print("read the secret")
except PermissionError:
    print("secret: permission denied")
info = json.loads((path / "store.json").read_text())
connection = http.client.HTTPConnection("127.0.0.1", info["port"], timeout=10)
connection.request("POST", "/", body=b"SELECT 42")
print("query:", connection.getresponse().status)
"""


def test_another_user_of_the_machine_can_neither_read_the_secret_nor_query(
    open_folder: Path,
) -> None:
    ensure_store(open_folder)
    assert stat.S_IMODE((open_folder / SECRET_FILE).stat().st_mode) == 0o600
    if os.getuid() != 0:
        return  # only root can become another user here; the mode above is what keeps them out
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    assert python is not None, "a python3 other users may run"
    stranger = subprocess.run(
        [python, "-c", STRANGER, str(open_folder)],
        capture_output=True,
        text=True,
        timeout=30,
        user=65534,
        group=65534,
        extra_groups=[],
        cwd="/",
    )
    assert stranger.stdout.splitlines() == ["secret: permission denied", "query: 401"], (
        stranger.stderr
    )


# -- Host header ----------------------------------------------------------------------------


def test_a_foreign_host_header_gets_403_even_with_the_password(
    store_url: str, owner: dict[str, str]
) -> None:
    """DNS rebinding: a web page whose name now points at 127.0.0.1 sends its own Host."""
    info = store_info(store_url)
    for host in ("evil.example", f"evil.example:{info.port}", f"127.0.0.1:{info.port + 1}", ""):
        status, body = request(info, ANSWER_SQL, {**owner, "Host": host})
        assert (status, ANSWER in body) == (403, False), host
        status, _ = request(info, "", {"Host": host}, method="GET", path="/ping")
        assert status == 403, host
    for host in (f"127.0.0.1:{info.port}", f"localhost:{info.port}", f"[::1]:{info.port}"):
        assert request(info, ANSWER_SQL, {**owner, "Host": host}) == (200, ANSWER + "\n"), host


# -- SQL that reaches outside the store ------------------------------------------------------

READS = [
    "SELECT * FROM file('{p}', 'LineAsString')",
    "SELECT * FROM FiLe('{p}', 'LineAsString')",
    "SELECT * FROM file /* hidden */ ('{p}', 'LineAsString')",
    "SELECT * FROM `file`('{p}', 'LineAsString')",
    "SELECT * FROM `f\\x69le`('{p}', 'LineAsString')",
    "SELECT file('{p}')",
    "SELECT * FROM `{p}`",
    "SELECT * FROM default.`{p}`",
    "SELECT * FROM (SELECT * FROM (SELECT * FROM file('{p}', 'LineAsString')))",
    "WITH t AS (SELECT * FROM file('{p}', 'LineAsString')) SELECT * FROM t",
    "SELECT * FROM url('http://127.0.0.1:9/', 'LineAsString')",
    "SELECT * FROM executable('cat {p}', 'LineAsString', 'line String')",
    "SELECT * FROM remote('127.0.0.1:9000', system.one)",
    "SELECT * FROM s3('http://127.0.0.1:9/x', 'LineAsString')",
]


@pytest.mark.parametrize("template", READS)
def test_sql_that_reads_a_file_is_refused_even_for_the_owner(
    ch: Client, secret_path: Path, template: str
) -> None:
    sql = template.replace("{p}", str(secret_path))
    with pytest.raises(DatabaseError) as refused:
        ch.query(sql)
    assert SECRET_TEXT not in str(refused.value)
    assert "497" in str(refused.value)  # ACCESS_DENIED, refused before it ran


def test_a_second_statement_cannot_ride_along(
    store_url: str, owner: dict[str, str], secret_path: Path, tmp_path: Path
) -> None:
    """The engine would run every statement of a request; the store takes one."""
    info = store_info(store_url)
    target = tmp_path / "out.csv"
    for sql in (
        f"SELECT 1; SELECT * FROM file('{secret_path}', 'LineAsString')",
        f"SELECT 1; INSERT INTO FUNCTION file('{target}', 'CSV', 'n UInt8') SELECT 42",
    ):
        status, body = request(info, sql, owner)
        assert status == 400 and "Multi-statements" in body, body
        assert SECRET_TEXT not in body
    assert not target.exists()


WRITES = [
    "SELECT 42 INTO OUTFILE '{p}'",
    "SELECT 42 INTO OUTFILE '{p}' FORMAT CSV",
    "INSERT INTO FUNCTION file('{p}', 'CSV', 'n UInt8') SELECT 42",
    "INSERT INTO FUNCTION FILE('{p}', 'CSV', 'n UInt8') VALUES (42)",
    "CREATE TABLE default.leak (n UInt8) ENGINE = File(CSV, '{p}')",
    "CREATE VIEW default.leak AS SELECT * FROM file('{p}', 'LineAsString')",
    "CREATE DATABASE leak ENGINE = Filesystem('{d}')",
    "CREATE DICTIONARY default.leak (line String) PRIMARY KEY line "
    "SOURCE(FILE(path '{p}' format 'LineAsString')) LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE TABLE default.leak (n UInt8) ENGINE = MergeTree ORDER BY n "
    "SETTINGS disk = disk(type = local, path = '{d}/')",
    "BACKUP TABLE default.kept TO File('{p}')",
    "SYSTEM SHUTDOWN",
]


@pytest.mark.parametrize("template", WRITES)
def test_sql_that_writes_or_attaches_files_is_refused_and_writes_nothing(
    ch: Client, tmp_path: Path, template: str
) -> None:
    target = tmp_path / "written" / "out.csv"
    target.parent.mkdir()
    sql = template.replace("{p}", str(target)).replace("{d}", str(target.parent))
    with pytest.raises(DatabaseError) as refused:
        ch.command(sql)
    assert "497" in str(refused.value)  # ACCESS_DENIED, not some other failure
    assert list(target.parent.iterdir()) == []
    assert ch.command("SELECT count() FROM system.tables WHERE name = 'leak'") == 0
    assert ch.ping()  # and it still serves


def test_into_outfile_is_refused_on_a_get_too(
    store_url: str, owner: dict[str, str], tmp_path: Path
) -> None:
    """A GET is read-only, yet `SELECT … INTO OUTFILE` is a SELECT: the guard is not the GET's."""
    target = tmp_path / "out.csv"
    status, body = request(
        store_info(store_url), f"SELECT 42 INTO OUTFILE '{target}'", owner, method="GET"
    )
    assert status == 403 and "OUTFILE" in body
    assert not target.exists()


def test_settings_that_name_files_are_refused(
    store_url: str, owner: dict[str, str], ch: Client, secret_path: Path
) -> None:
    info = store_info(store_url)
    connection = http.client.HTTPConnection(info.host, info.port, timeout=10)
    query = urlencode({"format_schema": f"{secret_path}:Message"})
    connection.request("POST", f"/?{query}", body=ANSWER_SQL.encode(), headers=owner)
    response = connection.getresponse()
    assert response.status == 403 and b"format_schema" in response.read()
    connection.close()
    for sql in (
        f"SET format_schema = '{secret_path}:Message'",
        f"SELECT 42 SETTINGS format_template_row = '{secret_path}'",
    ):
        with pytest.raises(DatabaseError, match="names a file"):
            ch.command(sql)


def test_the_owner_s_ordinary_sql_is_served(ch: Client, tmp_path: Path) -> None:
    """Names that merely look like the refused ones are columns, not calls."""
    ch.command("CREATE DATABASE IF NOT EXISTS gpuledger")
    ch.command(
        "CREATE TABLE gpuledger.links (url String, file String, `remote` UInt8) "
        "ENGINE = MergeTree ORDER BY url"
    )
    ch.command("INSERT INTO gpuledger.links VALUES ('http://x/', '/etc/x', 1)")
    rows = ch.query(
        "SELECT url, file, remote FROM gpuledger.links WHERE file LIKE '%/etc/%' -- file('x')"
    ).result_rows
    assert rows == [("http://x/", "/etc/x", 1)]
    ch.insert("gpuledger.links", [["u", "f", 2]], column_names=["url", "file", "remote"])
    assert ch.command("SELECT count() FROM gpuledger.links") == 2
    assert ch.query("SELECT {x:String} AS s", parameters={"x": "a\nb\\c"}).result_rows == [
        ("a\nb\\c",)
    ]
    with pytest.raises(DatabaseError, match="Syntax error"):
        ch.query("SELEC 1")


# -- the network -----------------------------------------------------------------------------


def run_store(path: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gpuledger.store", str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_non_loopback_host_without_a_password_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GPULEDGER_STORE_PASSWORD"}
    store = run_store(tmp_path / "store", "--host", "0.0.0.0", env=env)
    _, stderr = store.communicate(timeout=60)
    assert store.returncode == 1
    assert "GPULEDGER_STORE_PASSWORD" in stderr and "0.0.0.0" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "store" / "store.json").exists()

    cli = subprocess.run(
        [sys.executable, "-m", "gpuledger.cli", "store", str(tmp_path / "s2"), "--host", "::"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert cli.returncode != 0 and "GPULEDGER_STORE_PASSWORD" in cli.stderr


def test_a_non_loopback_host_serves_with_the_configured_password(tmp_path: Path) -> None:
    path = tmp_path / "store"
    password = "a configured password of some length"
    store = run_store(
        path, "--host", "0.0.0.0", env={**os.environ, "GPULEDGER_STORE_PASSWORD": password}
    )
    try:
        deadline = time.monotonic() + 60
        while (info := read_store_file(path)) is None:
            assert store.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert read_secret(path) == password  # the owner's clients still need no setup
        local = StoreInfo(port=info.port, pid=info.pid, version=info.version)
        assert request(local, ANSWER_SQL)[0] == 401
        assert request(local, ANSWER_SQL, {"Authorization": basic("default", password)}) == (
            200,
            ANSWER + "\n",
        )
        remote = connect(
            f"clickhouse://default:{password.replace(' ', '%20')}@127.0.0.1:{info.port}/gpuledger"
        )
        assert remote.command(ANSWER_SQL) == ANSWER
        remote.close()
        owner = connect(f"chdb://{path}", start=False)
        assert owner.command("SELECT 43") == 43
        owner.close()
    finally:
        store.terminate()
        store.communicate(timeout=30)
    assert not (path / SECRET_FILE).exists() and not (path / "store.json").exists()


def test_the_store_file_holds_no_secret(store_url: str) -> None:
    raw = (folder_of(store_url) / "store.json").read_text()
    assert read_secret(folder_of(store_url)) not in raw
    assert set(json.loads(raw)) == {"port", "pid", "version", "host", "owner_pid"}


def test_a_relative_file_name_reaches_no_file_of_the_starting_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's default database serves a file by a name relative to the working folder;
    the store works in an empty folder of its own, whoever started it from wherever."""
    (tmp_path / "private.csv").write_text(f"{SECRET_TEXT}\n")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "store"
    ensure_store(path)
    client = connect(f"chdb://{path}", start=False)
    try:
        for sql in ("SELECT * FROM `private.csv`", "SELECT * FROM default.`private.csv`"):
            with pytest.raises(DatabaseError) as refused:
                client.query(sql)
            assert SECRET_TEXT not in str(refused.value)
    finally:
        client.close()
        stop_owned_stores(path)
