"""The embedded ClickHouse store: one process owns a chdb folder and serves ClickHouse's HTTP
interface on 127.0.0.1 to the user who runs it, so that clickhouse-connect, the same DDL and
the same SQL run against it and against a ClickHouse server (docs/ARCHITECTURE.md §5).

Server side: `serve(path)` (also `python -m gpuledger.store PATH`). Client side:
`connect(url)` for `chdb:///PATH` (finds the store serving PATH through `PATH/store.json`, or
starts one as a child of this process) and for `clickhouse://` / `clickhouses://` servers.

The rooms: `url` (store URLs and `connect`), `spawn` (finding or starting the store of a
folder), `folder` (`store.json` and the password file), `server` (the HTTP server and its
handler), `protocol` (the pure pieces of ClickHouse's HTTP interface), `engine` (one chdb
session behind one lock), `door` (who gets in, under which Host name, and which SQL is served).
What the rest of gpuledger uses is named here.
"""

from gpuledger.store.folder import (
    DEFAULT_DATABASE,
    StoreError,
    StoreInfo,
    pid_alive,
    read_secret,
    read_store_file,
)
from gpuledger.store.server import serve
from gpuledger.store.spawn import ensure_store, stop_owned_stores, terminate
from gpuledger.store.url import StoreURL, connect, parse_store_url, redact_store_url

__all__ = [
    "DEFAULT_DATABASE",
    "StoreError",
    "StoreInfo",
    "StoreURL",
    "connect",
    "ensure_store",
    "parse_store_url",
    "pid_alive",
    "read_secret",
    "read_store_file",
    "redact_store_url",
    "serve",
    "stop_owned_stores",
    "terminate",
]
