"""The embedded ClickHouse store on the real engine: chdb behind ClickHouse's HTTP interface,
driven by clickhouse-connect as every part of gpuledger drives it."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from gpuledger.store import (
    StoreError,
    connect,
    ensure_store,
    parse_store_url,
    read_store_file,
    stop_owned_stores,
)
from gpuledger.store.spawn import owned_stores

pytestmark = pytest.mark.integration

ROWS = 200_000


def folder_of(store_url: str) -> Path:
    target = parse_store_url(store_url)
    assert target.path is not None
    return target.path


def make_cost_table(ch: Client, name: str = "facts", extra: str = "") -> str:
    ch.command("CREATE DATABASE IF NOT EXISTS gpuledger")
    ch.command(
        f"""CREATE TABLE gpuledger.{name} (
            ts DateTime64(3, 'UTC'), sign Int8, node LowCardinality(String), gpu_uuid String,
            util_sm Nullable(Float32), power_w Float32, cost_usd Float64, idle UInt8,
            process_pids Array(UInt32), labels Map(String, String)
        ) ENGINE = MergeTree ORDER BY (gpu_uuid, ts) {extra}"""
    )
    return f"gpuledger.{name}"


COLUMNS = [
    "ts",
    "sign",
    "node",
    "gpu_uuid",
    "util_sm",
    "power_w",
    "cost_usd",
    "idle",
    "process_pids",
    "labels",
]


@functools.cache
def cost_columns(n: int, start: datetime) -> list[list[object]]:
    """`n` cost rows, column by column, as a worker would insert them (built once per size)."""
    return [
        [start + timedelta(milliseconds=1000 * i + 250) for i in range(n)],
        [1 if i % 5 else -1 for i in range(n)],
        [f"node-{i % 8}" for i in range(n)],
        [f"GPU-{i % 64:04d}" for i in range(n)],
        [None if i % 7 == 0 else (i % 100) / 100 for i in range(n)],
        [300.0 + i % 50 for i in range(n)],
        [(i % 1000) * 0.000_1 for i in range(n)],
        [1 if i % 3 == 0 else 0 for i in range(n)],
        [[1000 + i % 4, 2000] if i % 2 else [] for i in range(n)],
        [{"team": f"team-{i % 3}", "job_id": f"job-{i % 11}"} for i in range(n)],
    ]


def test_cost_fact_columns_round_trip_with_their_types(ch: Client) -> None:
    table = make_cost_table(ch)
    start = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
    columns = cost_columns(20, start)
    summary = ch.insert(table, columns, column_names=COLUMNS, column_oriented=True)
    assert summary.written_rows == 20

    rows = ch.query(f"SELECT * FROM {table} ORDER BY ts").result_rows
    assert len(rows) == 20
    ts, sign, node, gpu, util, power, cost, idle, pids, labels = rows[7]
    assert ts == datetime(2026, 11, 23, 12, 0, 7, 250_000)  # naive UTC, milliseconds kept
    assert (sign, node, gpu, util, power, idle) == (1, "node-7", "GPU-0007", None, 307.0, 0)
    assert cost == pytest.approx(0.0007)
    assert pids == [1003, 2000]
    assert labels == {"team": "team-1", "job_id": "job-7"}
    assert rows[8][4] == pytest.approx(0.08)  # Float32 survives within its precision

    frame = ch.query_df(f"SELECT node, cost_usd, util_sm FROM {table} ORDER BY ts")
    assert list(frame["node"][:3]) == ["node-0", "node-1", "node-2"]
    assert frame["util_sm"].isna().sum() == 3

    arrow = ch.query_arrow(f"SELECT gpu_uuid, idle FROM {table} ORDER BY ts LIMIT 4")
    assert isinstance(arrow, pa.Table)
    assert arrow.column("idle").to_pylist() == [1, 0, 0, 1]

    # A frame read back goes in again unchanged (what a backfill from a notebook does).
    ch.insert_df(table, ch.query_df(f"SELECT * FROM {table} ORDER BY ts LIMIT 5"))
    counts = ch.query(f"SELECT count(), countIf(util_sm IS NULL) FROM {table}").result_rows
    assert counts == [(25, 4)]


def test_two_hundred_thousand_rows_arrive_whole_and_fast(ch: Client) -> None:
    table = make_cost_table(ch)
    columns = cost_columns(ROWS, datetime(2026, 11, 1, tzinfo=UTC))
    started = time.perf_counter()
    summary = ch.insert(table, columns, column_names=COLUMNS, column_oriented=True)
    elapsed = time.perf_counter() - started

    assert summary.written_rows == ROWS
    assert ch.command(f"SELECT count() FROM {table}") == ROWS
    assert ch.command(f"SELECT sum(sign) FROM {table}") == ROWS - 2 * (ROWS // 5)
    assert elapsed < 10.0, f"200k rows took {elapsed:.2f} s through the store"


@pytest.mark.parametrize("compression", ["lz4", "zstd", "gzip"])
def test_a_compressed_insert_of_many_frames_arrives_whole(store_url: str, compression: str) -> None:
    # The client compresses each block as a frame of its own; 200k rows make several blocks.
    client = connect(store_url, start=False, compress=compression)
    table = make_cost_table(client)
    columns = cost_columns(ROWS, datetime(2026, 11, 1, tzinfo=UTC))
    client.insert(table, columns, column_names=COLUMNS, column_oriented=True)
    assert client.command(f"SELECT count() FROM {table}") == ROWS
    assert client.command(f"SELECT uniqExact(ts) FROM {table}") == ROWS


def test_query_parameters_are_bound_by_the_server(ch: Client) -> None:
    table = make_cost_table(ch)
    start = datetime(2026, 11, 23, tzinfo=UTC)
    ch.insert(table, cost_columns(100, start), column_names=COLUMNS, column_oriented=True)

    rows = ch.query(
        f"SELECT count(), sum(idle) FROM {table} "
        "WHERE node = {node:String} AND ts >= {since:DateTime64(3, 'UTC')} "
        "AND ts < {until:DateTime64(3, 'UTC')} "
        "AND gpu_uuid IN {gpus:Array(String)}",
        parameters={
            "node": "node-3",
            "since": start + timedelta(seconds=10),
            "until": start + timedelta(seconds=60),
            "gpus": ["GPU-0011", "GPU-0019", "GPU-0027"],
        },
    ).result_rows
    assert rows == [(3, 1)]  # rows 11, 19 and 27; only 27 is idle

    quoted = ch.query("SELECT {label:String}", parameters={"label": "it's a \\ tab\t"})
    assert quoted.result_rows == [("it's a \\ tab\t",)]

    # A bind value this long travels in a multipart form instead of the URL.
    long_value = "x" * 6000
    assert ch.command("SELECT length({v:String})", parameters={"v": long_value}) == 6000


def test_sql_errors_raise_database_error_with_clickhouse_codes(ch: Client) -> None:
    table = make_cost_table(ch)
    with pytest.raises(DatabaseError) as unknown_table:
        ch.query("SELECT * FROM gpuledger.no_such_table")
    assert unknown_table.value.code == 60
    assert "UNKNOWN_TABLE" in str(unknown_table.value)

    with pytest.raises(DatabaseError) as syntax:
        ch.command("SELEC 1")
    assert syntax.value.code == 62

    with pytest.raises(DatabaseError) as unbound:
        ch.query("SELECT {missing:UInt8}")
    assert unbound.value.code == 456

    with pytest.raises(DatabaseError) as no_database:
        ch.query("SELECT 1 FROM nowhere.facts")
    assert no_database.value.code == 81

    with pytest.raises(DatabaseError) as bad_rows:
        ch.raw_insert(table, ["ts", "sign"], "not a time,x\n", fmt="CSV")
    assert bad_rows.value.code in (6, 27, 41)  # CANNOT_PARSE_*
    assert ch.command(f"SELECT count() FROM {table}") == 0  # and the store still answers


def test_settings_of_one_request_do_not_reach_the_next(ch: Client, store_url: str) -> None:
    baseline = ch.command("SELECT getSetting('max_block_size')")
    assert ch.command("SELECT getSetting('max_block_size')", settings={"max_block_size": 1234}) == (
        1234
    )
    assert ch.command("SELECT getSetting('max_block_size')") == baseline

    # SET belongs to the client's session, as on a ClickHouse server.
    in_session = connect(store_url, start=False, session_id="analyst-1")
    in_session.command("SET max_block_size = 777")
    assert in_session.command("SELECT getSetting('max_block_size')") == 777
    assert ch.command("SELECT getSetting('max_block_size')") == baseline
    with pytest.raises(DatabaseError) as unknown:
        ch.command("SET no_such_setting = 1")
    assert unknown.value.code == 115
    assert ch.command("SELECT getSetting('max_block_size')") == baseline


def test_a_block_inserted_twice_with_one_token_is_stored_once(ch: Client) -> None:
    table = make_cost_table(ch, extra="SETTINGS non_replicated_deduplication_window = 1000")
    ch.command(
        "CREATE TABLE gpuledger.cost_by_node (node String, cost_usd Float64) "
        "ENGINE = SummingMergeTree ORDER BY node "
        "SETTINGS non_replicated_deduplication_window = 1000"
    )
    ch.command(
        "CREATE MATERIALIZED VIEW gpuledger.cost_by_node_mv TO gpuledger.cost_by_node AS "
        f"SELECT node, sum(cost_usd * sign) AS cost_usd FROM {table} GROUP BY node"
    )
    columns = cost_columns(1000, datetime(2026, 11, 23, tzinfo=UTC))

    def insert(token: str) -> None:
        ch.insert(
            table,
            columns,
            column_names=COLUMNS,
            column_oriented=True,
            settings={
                "insert_deduplication_token": token,
                "deduplicate_blocks_in_dependent_materialized_views": 1,
            },
        )

    insert("worker-0/partition-3/offset-4711")
    once = ch.command("SELECT sum(cost_usd) FROM gpuledger.cost_by_node")
    insert("worker-0/partition-3/offset-4711")  # a retry after a crash
    assert ch.command(f"SELECT count() FROM {table}") == 1000
    assert ch.command("SELECT sum(cost_usd) FROM gpuledger.cost_by_node") == once
    insert("worker-0/partition-3/offset-9000")  # new data, same rows
    assert ch.command(f"SELECT count() FROM {table}") == 2000


def test_eight_threads_query_one_client_at_once(ch: Client) -> None:
    table = make_cost_table(ch)
    ch.insert(
        table,
        cost_columns(5000, datetime(2026, 11, 23, tzinfo=UTC)),
        column_names=COLUMNS,
        column_oriented=True,
    )
    expected = {
        n: ch.command(f"SELECT count() FROM {table} WHERE node = 'node-{n}'") for n in range(8)
    }
    failures: list[str] = []

    def board(n: int) -> None:
        for _ in range(15):
            rows = ch.query(
                f"SELECT count(), getSetting('max_block_size') FROM {table} "
                "WHERE node = {node:String}",
                parameters={"node": f"node-{n}"},
                settings={"max_block_size": 1000 + n},
            ).result_rows
            if rows != [(expected[n], 1000 + n)]:
                failures.append(f"thread {n}: {rows}")

    threads = [threading.Thread(target=board, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_the_store_answers_ping(ch: Client, store_url: str) -> None:
    assert ch.ping()
    info = read_store_file(folder_of(store_url))
    assert info is not None
    with urllib.request.urlopen(f"{info.http_url}/ping", timeout=5) as response:
        assert response.read() == b"Ok.\n"


HOLDER = """
import sys, time
from pathlib import Path
from gpuledger.store import connect, read_store_file
url, start_at, who = sys.argv[1], float(sys.argv[2]), sys.argv[3]
time.sleep(max(0.0, start_at - time.time()))
client = connect(url)
client.command(
    "CREATE TABLE IF NOT EXISTS default.visitors (who String) ENGINE = MergeTree ORDER BY who"
)
client.command("INSERT INTO default.visitors VALUES ({who:String})", parameters={"who": who})
print(client.url, flush=True)
sys.stdin.read()  # stay until the test lets go
"""


def start_holder(url: str, who: str, start_at: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, str(start_at), who],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def wait_gone(path: Path, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (path / "store.json").exists():
        assert time.monotonic() < deadline, f"{path}/store.json still there"
        time.sleep(0.05)


def test_two_processes_connecting_at_once_share_one_store(tmp_path: Path) -> None:
    path = tmp_path / "store"
    url = f"chdb://{path}"
    start_at = time.time() + 1.0
    first, second = (start_holder(url, who, start_at) for who in ("agent", "worker"))
    try:
        assert first.stdout is not None and second.stdout is not None
        addresses = {first.stdout.readline().strip(), second.stdout.readline().strip()}
        assert len(addresses) == 1, addresses
        info = read_store_file(path)
        assert info is not None and addresses == {f"http://127.0.0.1:{info.port}"}
        assert info.owner_pid in (first.pid, second.pid)
        reader = connect(url, start=False)
        visitors = reader.query("SELECT who FROM default.visitors ORDER BY who").result_rows
        assert visitors == [("agent",), ("worker",)]
        reader.close()
    finally:
        for holder in (first, second):
            holder.communicate(timeout=30)
    assert first.returncode == 0 and second.returncode == 0
    wait_gone(path)  # the owner stopped its store when it exited


def test_a_later_connect_restarts_the_store_after_its_owner_died(tmp_path: Path) -> None:
    path = tmp_path / "store"
    url = f"chdb://{path}"
    owner = start_holder(url, "agent", time.time())
    assert owner.stdout is not None
    owner.stdout.readline()
    old = read_store_file(path)
    assert old is not None

    owner.kill()  # SIGKILL: no atexit; the store notices its owner is gone
    owner.wait(timeout=10)
    client = connect(url)
    try:
        new = read_store_file(path)
        assert new is not None and new.pid != old.pid and new.owner_pid == os.getpid()
        assert client.query("SELECT who FROM default.visitors").result_rows == [("agent",)]
        # and a second connect in this process reuses it
        assert connect(url).command("SELECT count() FROM default.visitors") == 1
        assert read_store_file(path) == new
    finally:
        client.close()
        stop_owned_stores(path)
    wait_gone(path)


def test_sigterm_stops_the_store_and_frees_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "store"
    info = ensure_store(path)
    client = connect(f"chdb://{path}", start=False)
    client.command("CREATE TABLE default.kept (n UInt8) ENGINE = MergeTree ORDER BY n")
    client.command("INSERT INTO default.kept VALUES (7)")
    client.close()
    (store,) = [s for s in owned_stores() if s.path == path.resolve()]

    os.kill(info.pid, signal.SIGTERM)
    assert store.process.wait(timeout=15) == 0
    assert not (path / "store.json").exists()
    stop_owned_stores(path)

    # chdb admits one process per folder: opening it shows the store let go.
    reopened = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from chdb.session import Session; "
            "print(Session(sys.argv[1]).query('SELECT n FROM default.kept', 'TSV'))",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reopened.returncode == 0, reopened.stderr
    assert reopened.stdout.strip() == "7"


def test_a_folder_held_by_another_process_fails_with_the_store_log(tmp_path: Path) -> None:
    path = tmp_path / "store"
    path.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from chdb.session import Session; s = Session(sys.argv[1]); "
            "print('held', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError) as failed:
            connect(f"chdb://{path}")
        message = str(failed.value)
        assert f"open in another process (pid {holder.pid})" in message
        assert "store.log" in message
        assert not (path / "store.json").exists()
    finally:
        holder.communicate(timeout=30)


def test_store_file_says_where_the_store_listens(store_url: str) -> None:
    raw = json.loads((folder_of(store_url) / "store.json").read_text())
    assert set(raw) >= {"port", "pid", "version"}
    assert raw["version"].count(".") >= 2


def test_store_urls_name_a_chdb_folder_or_a_clickhouse_server() -> None:
    embedded = parse_store_url("chdb:///var/lib/gpuledger/store")
    assert embedded.scheme == "chdb" and embedded.path == Path("/var/lib/gpuledger/store")

    server = parse_store_url("clickhouse://ledger:p%40ss%2Fw0rd@ch.internal:8123/gpuledger")
    assert (server.host, server.port, server.username, server.password, server.database) == (
        "ch.internal",
        8123,
        "ledger",
        "p@ss/w0rd",
        "gpuledger",
    )
    secure = parse_store_url("clickhouses://ledger@ch.internal")
    assert (secure.port, secure.database) == (8443, "gpuledger")

    with pytest.raises(ValueError) as refused:
        connect("postgres://db.internal/gpuledger")
    assert "'postgres'" in str(refused.value)
    assert "chdb:///" in str(refused.value) and "clickhouse://" in str(refused.value)


def test_connect_without_start_names_the_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as missing:
        connect(f"chdb://{tmp_path / 'nothing-here'}", start=False)
    assert "no store serves" in str(missing.value)


def test_an_insert_the_engine_refuses_while_writing_fails_instead_of_vanishing(ch: Client) -> None:
    """chdb's streaming insert reports a block refused by a constraint as written; the store
    must answer with the engine's error, not a success with nothing stored."""
    ch.command("CREATE DATABASE IF NOT EXISTS scratch")
    ch.command(
        "CREATE TABLE scratch.checked (a UInt8, CONSTRAINT small CHECK a < 5) "
        "ENGINE = MergeTree ORDER BY a"
    )
    with pytest.raises(DatabaseError, match=r"VIOLATED_CONSTRAINT|469"):
        ch.insert("scratch.checked", [[1], [9]], column_names=["a"])
    assert ch.command("SELECT count() FROM scratch.checked") == 0
    ch.insert("scratch.checked", [[1], [2]], column_names=["a"])
    assert ch.command("SELECT count() FROM scratch.checked") == 2
