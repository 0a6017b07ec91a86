"""The embedded ClickHouse store: one process owns a chdb folder and serves ClickHouse's HTTP
interface on 127.0.0.1 to the user who runs it, so that clickhouse-connect, the same DDL and
the same SQL run against it and against a ClickHouse server (docs/ARCHITECTURE.md §5).

Server side: `serve(path)` (also `python -m gpuledger.store PATH`). Client side:
`connect(url)` for `chdb:///PATH` (finds the store serving PATH through `PATH/store.json`, or
starts one as a child of this process) and for `clickhouse://` / `clickhouses://` servers.

What the HTTP layer does for clickhouse-connect: URL parameters become settings of that one
request (applied under the engine lock and undone before the next request: nothing leaks
between clients), `param_x` feed `{x:Type}` placeholders, `INSERT … FORMAT X` bodies are split
at the format name and streamed to `Session.send_insert`, every lz4/zstd/gzip frame of a
compressed body is decompressed, results (Native, Arrow, …) pass through unchanged and
uncompressed, and errors carry ClickHouse's exception text and `X-ClickHouse-Exception-Code`.

Who gets in, under which Host name, and which SQL is served: `gpuledger.store_door`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import email.parser
import email.policy
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from gpuledger.store_door import (
    ACCESS_DENIED,
    AUTHENTICATION_FAILED,
    PASSWORD_ENV,
    STORE_USER,
    Door,
    is_loopback,
    request_credentials,
    setting_refusal,
    sql_refusal,
)

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

log = logging.getLogger("gpuledger.store")

STORE_FILE = "store.json"
SECRET_FILE = "store.secret"  # the password of the store serving the folder, mode 0600
SANDBOX_DIR = "empty"  # the store's working folder, kept empty: relative paths reach nothing
START_LOCK_FILE = ".start.lock"
LOG_FILE = "store.log"
DEFAULT_DATABASE = "gpuledger"

# ClickHouse error codes the store raises itself.
UNKNOWN_EXCEPTION = 1002
NOT_IMPLEMENTED = 48
SYNTAX_ERROR = 62
UNKNOWN_SETTING = 115
READONLY = 164
ABORTED = 236
STD_EXCEPTION = 1001

_INSERT_BUFFER_BYTES = 64 << 20  # an insert body larger than this spools to disk
_APPEND_CHUNK_BYTES = 4 << 20
_HEAD_LIMIT_BYTES = 1 << 20  # an INSERT statement longer than this is read as plain SQL


class StoreError(RuntimeError):
    """The store cannot start, or cannot be reached."""


_ERROR_COUNTS = "SELECT code, value FROM system.errors WHERE value > 0"
"""The engine's error counters (errors of this process since it started)."""


class StoreRequestError(Exception):
    """A request the store answers with a ClickHouse exception."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# store.json: how clients find the store serving a folder


@dataclass(frozen=True)
class StoreInfo:
    """What `PATH/store.json` says about the store serving PATH."""

    port: int
    pid: int
    version: str
    host: str = "127.0.0.1"
    owner_pid: int | None = None  # the process that started this store and stops it

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def store_file(path: Path) -> Path:
    return Path(path) / STORE_FILE


def read_store_file(path: Path) -> StoreInfo | None:
    """The store file of chdb folder `path`, or None when there is none (or it is unreadable)."""
    try:
        raw = json.loads(store_file(path).read_text())
        return StoreInfo(
            port=int(raw["port"]),
            pid=int(raw["pid"]),
            version=str(raw.get("version", "")),
            host=str(raw.get("host", "127.0.0.1")),
            owner_pid=int(raw["owner_pid"]) if raw.get("owner_pid") else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_store_file(path: Path, info: StoreInfo) -> None:
    target = store_file(path)
    tmp = target.with_name(f".{STORE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "port": info.port,
                "pid": info.pid,
                "version": info.version,
                "host": info.host,
                "owner_pid": info.owner_pid,
            }
        )
        + "\n"
    )
    os.replace(tmp, target)  # readers never see half a file


def secret_file(path: Path) -> Path:
    return Path(path) / SECRET_FILE


def read_secret(path: Path) -> str:
    """The password of the store serving chdb folder `path`, from `PATH/store.secret`."""
    target = secret_file(path)
    try:
        return target.read_text().strip()
    except PermissionError:
        raise StoreError(
            f"cannot read {target}: the store for {path} belongs to another user; run as that "
            "user, or connect with clickhouse://default:PASSWORD@host:port to a store started "
            f"with {PASSWORD_ENV}"
        ) from None
    except OSError as exc:
        raise StoreError(f"cannot read the store's password in {target}: {exc}") from None


def _write_secret(path: Path, secret: str) -> None:
    """Write the password readable by this user only: created with mode 0600 (never chmod-ed
    after, so it is never readable by others, not even for a moment), then renamed into place."""
    tmp = Path(path) / f".{SECRET_FILE}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    os.replace(tmp, secret_file(path))


def _remove_secret(path: Path, secret: str) -> None:
    with contextlib.suppress(OSError):
        if secret_file(path).read_text().strip() == secret:
            secret_file(path).unlink()


def _check_folder(path: Path) -> None:
    """Refuse a folder another user owns or may write to: they could swap the store's files."""
    st = path.stat()
    if st.st_uid != os.getuid():
        raise StoreError(
            f"chdb folder {path} belongs to another user (uid {st.st_uid}); serve a folder "
            "of your own"
        )
    if st.st_mode & 0o002:
        raise StoreError(
            f"chdb folder {path} is writable by every user; run `chmod o-w {path}` first"
        )


def _remove_store_file(path: Path, pid: int) -> None:
    info = read_store_file(path)
    if info is not None and info.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            store_file(path).unlink()


def pid_alive(pid: int) -> bool:
    """True while process `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def ping(info: StoreInfo, timeout_s: float = 2.0) -> bool:
    """True when a ClickHouse HTTP interface answers `GET /ping` at the store's address."""
    try:
        with urllib.request.urlopen(f"{info.http_url}/ping", timeout=timeout_s) as response:
            return bool(response.status == 200 and response.read().startswith(b"Ok."))
    except (OSError, urllib.error.URLError):
        return False


def live_store(path: Path) -> StoreInfo | None:
    """The store serving `path` when its process is alive and answers; None otherwise."""
    info = read_store_file(path)
    if info is None or not pid_alive(info.pid) or not ping(info):
        return None
    if info.owner_pid is not None and not pid_alive(info.owner_pid):
        return None  # it is stopping, since its owner is gone
    return info


# --------------------------------------------------------------------------------------------
# Pure pieces of the HTTP interface: parameters, statements, errors

# URL parameters that steer the HTTP exchange and are no ClickHouse settings for the engine.
_TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "session_id",
        "session_timeout",
        "session_check",
        "query_id",
        "quota_key",
        "user",
        "password",
        "role",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "enable_http_compression",
        "http_zlib_compression_level",
        "cancel_http_readonly_queries_on_client_close",
        "add_http_cors_header",
        "http_wait_end_of_query",
        "http_response_buffer_size",
        "compress",
        "decompress",
        "readonly",
    }
)
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_READ_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS", "("})
_LEADING_NOISE = re.compile(r"^(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)
_KEYWORD = re.compile(r"\(|[A-Za-z_]+")
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z][A-Za-z0-9_]*)\s*;?\s*$", re.IGNORECASE)
_INSERT_WITH_FORMAT = re.compile(
    rb"^(?:\s|--[^\n]*\n|/\*.*?\*/)*"
    rb"(INSERT\s(?:(?!\bVALUES\b).)*?)"
    rb"\bFORMAT\s+([A-Za-z][A-Za-z0-9_]*)[ \t\r]*(\n|\Z)",
    re.IGNORECASE | re.DOTALL,
)
_ERROR_CODE = re.compile(r"Code: (\d+)\.")
_USE = re.compile(
    r"^\s*USE\s+(`(?:[^`\\]|\\.)+`|\"(?:[^\"\\]|\\.)+\"|[A-Za-z0-9_]+)\s*;?\s*$", re.I
)

_CONTENT_TYPES = {
    "Native": "application/octet-stream",
    "RowBinary": "application/octet-stream",
    "RowBinaryWithNamesAndTypes": "application/octet-stream",
    "Arrow": "application/octet-stream",
    "ArrowStream": "application/octet-stream",
    "Parquet": "application/octet-stream",
    "JSON": "application/json; charset=UTF-8",
    "JSONCompact": "application/json; charset=UTF-8",
    "JSONEachRow": "application/x-ndjson; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "CSVWithNames": "text/csv; charset=UTF-8; header=present",
}


@dataclass
class RequestParams:
    """What the URL parameters of one request ask for."""

    settings: dict[str, str] = field(default_factory=dict)
    query_params: dict[str, str] = field(default_factory=dict)
    database: str | None = None
    session_id: str | None = None
    session_timeout_s: float = 60.0
    query_id: str = ""
    default_format: str = "TabSeparated"
    query: str = ""
    readonly: bool = False


def parse_request_params(pairs: Iterable[tuple[str, str]]) -> RequestParams:
    """Sort the URL (or form) parameters of a request into settings, bind values and the rest."""
    out = RequestParams()
    for name, value in pairs:
        if name.startswith("param_"):
            out.query_params[name[len("param_") :]] = value
        elif name == "query":
            out.query = value
        elif name == "database":
            out.database = value or None
        elif name == "session_id":
            out.session_id = value or None
        elif name == "session_timeout":
            with contextlib.suppress(ValueError):
                out.session_timeout_s = float(value)
        elif name == "query_id":
            out.query_id = value
        elif name == "default_format":
            out.default_format = value or out.default_format
        elif name == "readonly":
            out.readonly = value not in ("", "0")
        elif name in ("compress", "decompress") and value not in ("", "0"):
            raise StoreRequestError(
                NOT_IMPLEMENTED,
                f"URL parameter {name}={value} asks for ClickHouse's own block compression, "
                "which the embedded store does not speak; use HTTP compression "
                "(Content-Encoding) instead",
            )
        elif name in _TRANSPORT_PARAMS:
            continue
        elif not _SETTING_NAME.match(name):
            raise StoreRequestError(
                UNKNOWN_SETTING, f"URL parameter {name!r} is no setting name; remove it"
            )
        else:
            out.settings[name] = value
    return out


def statement_keyword(sql: str) -> str:
    """The first keyword of a statement, upper case ('(' for a parenthesised SELECT)."""
    rest = sql[_LEADING_NOISE.match(sql).end() :]  # type: ignore[union-attr]
    match = _KEYWORD.match(rest)
    return match.group(0).upper() if match else ""


def output_format(sql: str, default: str) -> str:
    """The output format a statement names at its end, else `default`."""
    match = _TRAILING_FORMAT.search(sql)
    return match.group(1) if match else default


@dataclass(frozen=True)
class InsertHead:
    """The statement part of an `INSERT … FORMAT X` request and where its data starts."""

    statement: str
    fmt: str
    data_offset: int


def split_insert(head: bytes, complete: bool) -> InsertHead | None:
    """Split `INSERT … FORMAT X\\n<data>` into the statement, the format and the data offset.

    The data starts after the format name, blanks, and one newline; nothing else is skipped, since
    binary formats may start with a byte that looks like white space. `complete` says that `head`
    is the whole request, so the statement may end without a newline.
    """
    match = _INSERT_WITH_FORMAT.match(head)
    if match is None or (not match.group(3) and not complete):
        return None
    return InsertHead(
        statement=match.group(1).decode("utf-8").strip(),
        fmt=match.group(2).decode("ascii"),
        data_offset=match.end(),
    )


def sql_string(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def error_code(message: str) -> int:
    match = _ERROR_CODE.search(message)
    return int(match.group(1)) if match else STD_EXCEPTION


def exception_text(message: str) -> str:
    """ClickHouse's `Code: N. DB::Exception: …` text out of a chdb error message."""
    start = message.find("Code: ")
    return message[start:] if start >= 0 else f"Code: {STD_EXCEPTION}. DB::Exception: {message}"


_HTTP_STATUS = {
    **dict.fromkeys((6, 27, 36, 41, 42, 43, 47, 53, 62, 115, 456, 457), 400),  # bad request
    **dict.fromkeys((46, 60, 81), 404),  # unknown function, table, database
    NOT_IMPLEMENTED: 501,
    READONLY: 403,
    ACCESS_DENIED: 403,
    AUTHENTICATION_FAILED: 401,
}


def http_status(code: int) -> int:
    """The HTTP status ClickHouse answers an exception with (never a retryable 429/503/504)."""
    return _HTTP_STATUS.get(code, 500)


# --------------------------------------------------------------------------------------------
# Request bodies: chunked transfer, every compressed frame


def _decompressor_factory(encoding: str) -> Callable[[], Any] | None:
    """A maker of incremental decompressors (`decompress`, `eof`, `unused_data`), one per frame."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding == "lz4":
        import lz4.frame

        return lambda: lz4.frame.LZ4FrameDecompressor()
    if encoding == "zstd":
        with contextlib.suppress(ImportError):
            from backports import zstd  # installed with clickhouse-connect

            return lambda: zstd.ZstdDecompressor()
    if encoding in ("gzip", "x-gzip"):
        return lambda: zlib.decompressobj(wbits=31)
    if encoding == "deflate":
        return lambda: zlib.decompressobj()
    raise StoreRequestError(
        NOT_IMPLEMENTED,
        f"Content-Encoding {encoding!r} is not supported by the embedded store; "
        "send lz4, zstd, gzip, deflate or no compression",
    )


def decompress_frames(chunks: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """Decompress a body of one or more concatenated frames (clickhouse-connect compresses each
    block as a frame of its own: reading only the first would silently drop the rest)."""
    factory = _decompressor_factory(encoding)
    if factory is None:
        yield from chunks
        return
    decompressor = factory()
    pending = False  # a frame has started and not ended
    for chunk in chunks:
        data = chunk
        while data:
            pending = True
            try:
                out = decompressor.decompress(data)
            except Exception as exc:
                raise StoreRequestError(
                    STD_EXCEPTION, f"cannot decompress the {encoding} request body: {exc}"
                ) from exc
            if out:
                yield out
            if decompressor.eof:
                data = decompressor.unused_data
                decompressor = factory()
                pending = False
            else:
                data = b""
    if pending:
        raise StoreRequestError(
            STD_EXCEPTION, f"the {encoding} request body ends in the middle of a frame"
        )


def _chunked_body(rfile: BinaryIO | Any) -> Iterator[bytes]:
    while True:
        line = rfile.readline(65537)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise StoreRequestError(STD_EXCEPTION, f"bad chunk size line {line[:40]!r}") from exc
        if size == 0:
            while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        remaining = size
        while remaining:
            piece = rfile.read(min(remaining, 1 << 20))
            if not piece:
                raise StoreRequestError(STD_EXCEPTION, "the request body ended early")
            remaining -= len(piece)
            yield piece
        rfile.readline(3)


def _sized_body(rfile: BinaryIO | Any, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining:
        piece = rfile.read(min(remaining, 1 << 20))
        if not piece:
            raise StoreRequestError(STD_EXCEPTION, "the request body ended early")
        remaining -= len(piece)
        yield piece


# --------------------------------------------------------------------------------------------
# The engine: one chdb Session behind one lock


@dataclass
class Outcome:
    """What a statement returned, for the response body and X-ClickHouse-Summary."""

    body: bytes | memoryview = b""
    read_rows: int = 0
    read_bytes: int = 0
    written_rows: int = 0
    written_bytes: int = 0
    elapsed_s: float = 0.0
    keep: Any = None  # the chdb result that owns `body`'s memory

    def summary(self) -> str:
        return json.dumps(
            {
                "read_rows": str(self.read_rows),
                "read_bytes": str(self.read_bytes),
                "written_rows": str(self.written_rows),
                "written_bytes": str(self.written_bytes),
                "total_rows_to_read": str(self.read_rows),
                "result_rows": str(self.written_rows),
                "result_bytes": str(self.written_bytes),
                "elapsed_ns": str(int(self.elapsed_s * 1e9)),
            }
        )


class ChdbEngine:
    """One chdb Session for a folder. chdb sessions are not safe across threads, so every
    statement runs under one lock; the request's database and settings are put in place under
    that lock and the previous request's are undone, so requests never see each other's."""

    def __init__(self, path: Path, lock_wait_s: float = 3.0) -> None:
        from chdb.session import Session

        # chdb reports a held folder only on stderr, so look at its lock first; a store that
        # was just stopped may still be letting go of it.
        deadline = time.monotonic() + lock_wait_s
        while (holder := folder_holder(path)) is not None:
            if time.monotonic() > deadline:
                raise StoreError(
                    f"chdb folder {path} is open in another process ({holder}); a chdb folder "
                    "admits one process at a time: stop that process, or connect to its store"
                )
            time.sleep(0.1)
        try:
            self._session: Any = Session(str(path))
        except Exception as exc:  # chdb raises its own error types
            raise StoreError(f"cannot open chdb folder {path}: {exc}") from exc
        self._lock = threading.Lock()
        self._verdicts: dict[str, str | None] = {}  # statement -> why it is refused (or None)
        self._database = "default"
        self._applied: dict[str, str] = {}  # settings currently differing from the baseline
        self._baseline = {
            name: (value, bool(changed))
            for name, value, changed in self._rows(
                "SELECT name, value, changed FROM system.settings"
            )
        }
        self.version, self.timezone = self._rows("SELECT version(), timezone()")[0]

    def _raw(self, sql: str, fmt: str, params: dict[str, str] | None = None) -> Any:
        if self._session is None:
            raise StoreRequestError(ABORTED, "the store is stopping; retry against a new store")
        return self._session.query(sql, fmt, params=params or {})

    def _rows(self, sql: str) -> list[list[Any]]:
        text = bytes(self._raw(sql, "JSONCompactEachRow").bytes()).decode()
        return [json.loads(line) for line in text.splitlines() if line]

    def _reset_expr(self, name: str) -> str:
        value, changed = self._baseline.get(name, ("", False))
        return f"{name} = {sql_string(value)}" if changed else f"{name} = DEFAULT"

    def _apply_settings(self, wanted: dict[str, str]) -> None:
        to_set = {
            name: value
            for name, value in wanted.items()
            if self._applied.get(name, self._baseline.get(name, (None, False))[0]) != value
        }
        to_reset = [name for name in self._applied if name not in wanted]
        parts = [f"{name} = {sql_string(value)}" for name, value in to_set.items()]
        parts += [self._reset_expr(name) for name in to_reset]
        if not parts:
            return
        try:
            self._raw("SET " + ", ".join(parts), "TSV")
        except Exception:
            # Part of the SET may have taken: put every name it touched back to the baseline.
            for name in [*to_set, *to_reset]:
                with contextlib.suppress(Exception):
                    self._raw("SET " + self._reset_expr(name), "TSV")
                self._applied.pop(name, None)
            raise
        for name in to_reset:
            self._applied.pop(name, None)
        for name, value in to_set.items():
            if self._baseline.get(name, (None, False))[0] == value:
                self._applied.pop(name, None)
            else:
                self._applied[name] = value

    def _guard(self, sql: str) -> None:
        """Refuse a statement that reaches outside the store (see `sql_refusal`), judged on the
        text ClickHouse's own parser gives back; verdicts are kept per statement text."""
        verdict = self._verdicts.get(sql, "")
        if verdict == "":
            canonical = bytes(
                self._raw("SELECT formatQuery({q:String})", "TSVRaw", {"q": _escaped(sql)}).bytes()
            ).decode("utf-8")
            verdict = sql_refusal(canonical)
            if len(self._verdicts) >= 4096:
                self._verdicts.clear()
            self._verdicts[sql] = verdict
        if verdict is not None:
            raise StoreRequestError(ACCESS_DENIED, verdict)

    def _prepare(self, database: str, settings: dict[str, str]) -> None:
        refused = setting_refusal(settings)
        if refused is not None:
            raise StoreRequestError(ACCESS_DENIED, refused)
        if database != self._database:
            self._raw(f"USE {sql_identifier(database)}", "TSV")
            self._database = database
        self._apply_settings(settings)

    def query(
        self, sql: str, fmt: str, params: dict[str, str], database: str, settings: dict[str, str]
    ) -> Outcome:
        with self._lock, _engine_errors():
            self._guard(sql)
            self._prepare(database, settings)
            result = self._raw(sql, fmt, params)
        wrapper = result.get_memview() if result.size() else None
        return Outcome(
            body=wrapper.view() if wrapper is not None else b"",
            read_rows=int(result.rows_read()),
            read_bytes=int(result.bytes_read()),
            written_rows=int(result.rows_written()),
            written_bytes=int(result.bytes_written()),
            elapsed_s=float(result.elapsed()),
            keep=(result, wrapper),  # the view points into their memory
        )

    def insert(
        self,
        statement: str,
        fmt: str,
        data: Iterable[bytes],
        database: str,
        settings: dict[str, str],
    ) -> Outcome:
        started = time.perf_counter()
        with self._lock, _engine_errors():
            self._guard(f"{statement} FORMAT {fmt}")
            self._prepare(database, settings)
            if self._session is None:
                raise StoreRequestError(ABORTED, "the store is stopping")
            errors_before = self._error_counts()
            inserter = self._session.send_insert(statement, fmt)
            try:
                for chunk in data:
                    inserter.append(chunk)
                result = inserter.finish()
            except BaseException:
                with contextlib.suppress(Exception):
                    inserter.cancel()
                raise
            self._raise_swallowed(errors_before)
        return Outcome(
            written_rows=int(result.rows_written),
            written_bytes=int(result.bytes_written),
            elapsed_s=time.perf_counter() - started,
        )

    def _error_counts(self) -> dict[int, int]:
        return {int(code): int(n) for code, n in self._rows(_ERROR_COUNTS)}

    def _raise_swallowed(self, before: dict[int, int]) -> None:
        """chdb's streaming insert reports success when the engine refused the block while
        writing it (a violated constraint: nothing stored, `rows_written` counts it all); the
        engine's error counters still tell, and the request fails with that error."""
        after = self._rows(
            "SELECT code, value, last_error_message FROM system.errors WHERE value > 0"
        )
        for code, count, message in after:
            if int(count) > before.get(int(code), 0):
                raise StoreRequestError(int(code), str(message))

    def run_set(self, sql: str, database: str) -> dict[str, str]:
        """Check a `SET` statement and return the settings it changes, leaving the engine as it
        was (a SET belongs to the client's session, never to the shared engine)."""
        query = "SELECT name, value FROM system.settings"
        with self._lock, _engine_errors():
            self._guard(sql)
            self._prepare(database, {})
            before = dict(self._rows(query))
            try:
                self._raw(sql, "TSV")
            finally:
                changed = {n: v for n, v in self._rows(query) if before.get(n) != v}
                for name, value in changed.items():
                    self._applied[name] = value  # so that the reset below puts it back
                self._apply_settings({})
        return changed

    def check_database(self, database: str) -> None:
        with self._lock, _engine_errors():
            self._prepare(database, {})

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            if session is not None:
                session.close()


def folder_holder(path: Path) -> str | None:
    """Who holds chdb folder `path` ("pid N"), or None when it is free.

    ClickHouse keeps an exclusive flock on `PATH/status` while the folder is open and writes its
    pid into that file."""
    try:
        fd = os.open(Path(path) / "status", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        match = re.search(r"PID: (\d+)", text)
        return f"pid {match.group(1)}" if match else "a process that did not write its pid"
    finally:
        os.close(fd)  # also drops the lock this probe may have taken
    return None


def _escaped(value: str) -> str:
    """A query parameter value as ClickHouse reads it (TSV escaping)."""
    return value.translate(
        {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"}
    )


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    try:
        yield
    except StoreRequestError:
        raise
    except Exception as exc:  # chdb raises RuntimeError subclasses with ClickHouse's text
        text = str(exc)
        raise StoreRequestError(error_code(text), exception_text(text)) from exc


# --------------------------------------------------------------------------------------------
# Sessions: SET and USE of a client that sends a session_id


@dataclass
class _ClientSession:
    settings: dict[str, str] = field(default_factory=dict)
    database: str | None = None
    last_used: float = 0.0
    timeout_s: float = 60.0


class _Sessions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, _ClientSession] = {}

    def get(self, session_id: str | None, timeout_s: float) -> _ClientSession | None:
        if session_id is None:
            return None
        now = time.monotonic()
        with self._lock:
            for key in [k for k, s in self._by_id.items() if now - s.last_used > s.timeout_s]:
                del self._by_id[key]
            session = self._by_id.setdefault(session_id, _ClientSession())
            session.last_used, session.timeout_s = now, timeout_s
            return session


# --------------------------------------------------------------------------------------------
# HTTP


class StoreServer(ThreadingHTTPServer):
    """ClickHouse's HTTP interface over one chdb folder."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # bursts of new connections from many client threads

    def __init__(self, path: Path, password: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.path = Path(path)
        self.engine = ChdbEngine(self.path)
        self.sessions = _Sessions()
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            self.engine.close()
            raise StoreError(f"cannot listen on {host}:{port}: {exc}; pick another --port") from exc
        self.door = Door(password=password, listen_host=host, port=int(self.server_address[1]))
        self._stopping = threading.Event()

    @property
    def info(self) -> StoreInfo:
        host, port = self.server_address[:2]
        return StoreInfo(
            port=int(port), pid=os.getpid(), version=self.engine.version, host=str(host)
        )

    def request_stop(self) -> None:
        """Stop serving (safe from any thread and from a signal handler)."""
        if not self._stopping.is_set():
            self._stopping.set()
            threading.Thread(target=self.shutdown, name="store-stop", daemon=True).start()

    def close(self) -> None:
        self.server_close()
        self.engine.close()


class _Handler(BaseHTTPRequestHandler):
    server: StoreServer
    protocol_version = "HTTP/1.1"  # keep-alive, as clickhouse-connect's connection pool expects
    server_version = "gpuledger-store"
    # Headers and body leave in separate writes: with Nagle's algorithm each answer would wait
    # for the client's delayed ACK (about 40 ms).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _admitted(self, ping: bool) -> bool:
        """Answer 403 to a Host header naming no address the store listens on (DNS rebinding)
        and 401 to a request without the store's credentials (`/ping` needs none)."""
        door = self.server.door
        if not door.host_allowed(self.headers.get("Host")):
            self.close_connection = True
            self._fail(
                ACCESS_DENIED,
                f"Host {self.headers.get('Host')!r} is not an address this store listens on; "
                f"connect to 127.0.0.1:{door.port}",
                "",
            )
            return False
        if ping or door.admits(*request_credentials(self.headers)):
            return True
        self.close_connection = True  # the body is left unread
        self._fail(
            AUTHENTICATION_FAILED,
            f"{STORE_USER}: Authentication failed: the embedded store needs its password, which "
            f"gpuledger's clients read from {secret_file(self.server.path)}",
            "",
            {"WWW-Authenticate": 'Basic realm="gpuledger store"'},
        )
        return False

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        ping = (
            url.path.rstrip("/") in ("/ping", "", "/replicas_status") and "query" not in url.query
        )
        if not self._admitted(ping):
            return
        if url.path.rstrip("/") in ("/ping", "") and "query" not in url.query:
            self._answer(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
            return
        if url.path.rstrip("/") == "/replicas_status":
            self._answer(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
            return
        self._execute()

    def do_POST(self) -> None:
        if self._admitted(ping=False):
            self._execute()

    def _answer(self, status: int, body: bytes | memoryview, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _fail(
        self, code: int, text: str, query_id: str, extra: dict[str, str] | None = None
    ) -> None:
        if not text.startswith("Code: "):
            text = f"Code: {code}. DB::Exception: {text}"
        body = f"{text} (version {self.server.engine.version})\n".encode()
        self._answer(
            http_status(code),
            body,
            {
                "Content-Type": "text/plain; charset=UTF-8",
                "X-ClickHouse-Exception-Code": str(code),
                "X-ClickHouse-Query-Id": query_id,
                **(extra or {}),
            },
        )

    def _execute(self) -> None:
        query_id = str(uuid.uuid4())
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = _chunked_body(self.rfile)
        else:
            raw = _sized_body(self.rfile, int(self.headers.get("Content-Length") or 0))
        try:
            params = parse_request_params(
                parse_qsl(urlsplit(self.path).query, keep_blank_values=True)
            )
            query_id = params.query_id or query_id
            params.readonly |= self.command == "GET"  # as on a ClickHouse server
            body = decompress_frames(raw, self.headers.get("Content-Encoding", ""))
            content_type = self.headers.get("Content-Type", "")
            if content_type.startswith("multipart/form-data"):
                params, body = self._form(params, content_type, body), iter(())
            self._dispatch(params, query_id, body)
        except StoreRequestError as exc:
            self._drain(raw)
            self._fail(exc.code, str(exc), query_id)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            log.exception("request failed")
            self._drain(raw)
            self._fail(UNKNOWN_EXCEPTION, f"the store failed: {exc!r}", query_id)

    def _drain(self, raw: Iterator[bytes]) -> None:
        """Read the rest of a failed request, so that the client reads the error."""
        try:
            for _ in raw:
                pass
        except Exception:
            self.close_connection = True  # the body is unreadable: the stream is out of step

    def _form(
        self, params: RequestParams, content_type: str, body: Iterator[bytes]
    ) -> RequestParams:
        """Fields of a multipart form (clickhouse-connect sends large bind values this way)."""
        raw = b"".join(body)
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
        )
        pairs: list[tuple[str, str]] = []
        for part in message.walk():
            if part.is_multipart():
                continue
            name = part.get_param("name", header="content-disposition")
            if part.get_filename():
                raise StoreRequestError(
                    NOT_IMPLEMENTED, f"external data ({name!r}) is not supported by the store"
                )
            payload = part.get_payload(decode=True)
            text = payload.decode("utf-8") if isinstance(payload, bytes) else ""
            pairs.append((str(name), text))
        form = parse_request_params(pairs)
        params.query = form.query or params.query
        params.query_params.update(form.query_params)
        params.settings.update(form.settings)
        return params

    def _dispatch(self, params: RequestParams, query_id: str, body: Iterator[bytes]) -> None:
        server = self.server
        session = server.sessions.get(params.session_id, params.session_timeout_s)
        database = params.database or (session.database if session else None) or "default"
        settings = {**(session.settings if session else {}), **params.settings}

        # The SQL is the `query` parameter, then the body; an INSERT's data follows its FORMAT.
        stream = _Prepended(params.query.encode() + b"\n" if params.query else b"", body)
        head, complete = stream.read_head(
            lambda h, done: split_insert(h, done) is not None, _HEAD_LIMIT_BYTES
        )
        insert = split_insert(head, complete)
        if insert is not None:
            if params.readonly:
                raise StoreRequestError(READONLY, "cannot insert in readonly mode")
            data = _spool(head[insert.data_offset :], stream)
            try:
                outcome = server.engine.insert(
                    insert.statement, insert.fmt, _file_chunks(data), database, settings
                )
            finally:
                data.close()
            self._answer(200, b"", self._headers(query_id, outcome, None))
            return

        sql = (head + b"".join(stream)).decode("utf-8").strip()
        if not sql:
            raise StoreRequestError(SYNTAX_ERROR, "empty query: send SQL in the body or ?query=")
        keyword = statement_keyword(sql)
        if params.readonly and keyword not in _READ_KEYWORDS:
            raise StoreRequestError(READONLY, f"cannot execute {keyword} in readonly mode")
        if keyword == "SET":
            changed = server.engine.run_set(sql, database)
            if session is not None:
                session.settings.update(changed)
            self._answer(200, b"", self._headers(query_id, Outcome(), None))
            return
        if keyword == "USE":
            match = _USE.match(sql)
            if match is None:
                raise StoreRequestError(SYNTAX_ERROR, f"cannot read the database name in {sql!r}")
            name = match.group(1)
            if name[0] in '`"':
                name = re.sub(r"\\(.)", r"\1", name[1:-1])
            server.engine.check_database(name)
            if session is not None:
                session.database = name
            self._answer(200, b"", self._headers(query_id, Outcome(), None))
            return
        fmt = output_format(sql, params.default_format)
        outcome = server.engine.query(sql, fmt, params.query_params, database, settings)
        shows_result = keyword in _READ_KEYWORDS or bool(outcome.body)
        self._answer(
            200, outcome.body, self._headers(query_id, outcome, fmt if shows_result else None)
        )

    def _headers(self, query_id: str, outcome: Outcome, fmt: str | None) -> dict[str, str]:
        headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Summary": outcome.summary(),
            "X-ClickHouse-Timezone": self.server.engine.timezone,
        }
        if fmt is not None:
            headers["X-ClickHouse-Format"] = fmt
            headers["Content-Type"] = _CONTENT_TYPES.get(
                fmt, "text/tab-separated-values; charset=UTF-8"
            )
        else:
            headers["Content-Type"] = "text/plain; charset=UTF-8"
        return headers


class _Prepended:
    """A byte stream: a prefix, then an iterator's chunks; the head can be read ahead."""

    def __init__(self, prefix: bytes, rest: Iterator[bytes]) -> None:
        self._pending = [prefix] if prefix else []
        self._rest = rest

    def read_head(self, enough: Callable[[bytes, bool], bool], limit: int) -> tuple[bytes, bool]:
        """Read until `enough(head, complete)` or `limit` bytes; return (head, stream ended)."""
        head = b"".join(self._pending)
        self._pending = []
        while not enough(head, False) and len(head) < limit:
            chunk = next(self._rest, None)
            if chunk is None:
                return head, True
            head += chunk
        return head, False

    def __iter__(self) -> Iterator[bytes]:
        yield from self._pending
        self._pending = []
        yield from self._rest


def _spool(first: bytes, rest: Iterable[bytes]) -> IO[bytes]:
    """Receive the whole insert body before taking the engine lock, so that a slow or stalled
    client never holds up the other clients; large bodies go to a temporary file."""
    spool = tempfile.SpooledTemporaryFile(max_size=_INSERT_BUFFER_BYTES)  # noqa: SIM115
    spool.write(first)
    for chunk in rest:
        spool.write(chunk)
    spool.seek(0)
    return spool


def _file_chunks(data: IO[bytes]) -> Iterator[bytes]:
    while chunk := data.read(_APPEND_CHUNK_BYTES):
        yield chunk


# --------------------------------------------------------------------------------------------
# Serving


def serve(
    path: Path,
    port: int = 0,
    host: str = "127.0.0.1",
    ready: Callable[[StoreInfo], None] | None = None,
    *,
    owner_pid: int | None = None,
) -> None:
    """Serve chdb folder `path` until SIGTERM or SIGINT (blocking).

    Writes `PATH/store.secret` (the password, mode 0600) and then `PATH/store.json` once it
    answers, and removes both on the way out; the chdb session is closed on the way out, which
    frees the folder for the next process. With `owner_pid`, it also stops when that process (its
    parent) is gone. The password is `GPULEDGER_STORE_PASSWORD` when set, else a random one; a
    non-loopback `host` is refused without a configured password.
    """
    configured = os.environ.get(PASSWORD_ENV, "")
    if not is_loopback(host) and not configured:
        raise StoreError(
            f"--host {host} would open the store to the network without a password; set "
            f"{PASSWORD_ENV} (clients then use clickhouse://default:PASSWORD@HOST:PORT), "
            "or keep --host 127.0.0.1"
        )
    password = configured or secrets.token_urlsafe(32)
    path = Path(path).resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_folder(path)
    # The engine's default database also serves files by relative path from the working folder:
    # make that an empty folder of the store's own.
    sandbox = path / SANDBOX_DIR
    sandbox.mkdir(mode=0o700, exist_ok=True)
    os.chdir(sandbox)
    server = StoreServer(path, password, host=host, port=port)
    info = dataclasses.replace(server.info, owner_pid=owner_pid)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: server.request_stop())
    if owner_pid is not None:
        threading.Thread(
            target=_watch_owner, args=(server, owner_pid), name="store-owner", daemon=True
        ).start()
    try:
        _write_secret(path, password)  # before store.json: a client that finds one finds both
        _write_store_file(path, info)
        log.info("store serving %s on %s (chdb engine %s)", path, info.http_url, info.version)
        if ready is not None:
            ready(info)
        server.serve_forever(poll_interval=0.2)
    finally:
        _remove_store_file(path, info.pid)
        _remove_secret(path, password)
        server.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.info("store for %s stopped", path)


def _watch_owner(server: StoreServer, owner_pid: int) -> None:
    # When the owner is the parent, reparenting shows its death even while it lingers as a
    # zombie that its own parent has not reaped.
    is_parent = os.getppid() == owner_pid
    while not server._stopping.wait(0.2):
        if (is_parent and os.getppid() != owner_pid) or not pid_alive(owner_pid):
            log.info("owner process %s is gone: stopping", owner_pid)
            server.request_stop()
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpuledger.store",
        description="Serve a chdb folder over ClickHouse's HTTP interface on 127.0.0.1 (a "
        f"non-loopback --host needs {PASSWORD_ENV}).",
    )
    parser.add_argument("path", type=Path, help="the chdb folder (created when missing)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--owner-pid", type=int, default=None, help="stop when this parent process is gone"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        serve(args.path, port=args.port, host=args.host, owner_pid=args.owner_pid)
    except StoreError as exc:
        print(f"gpuledger store: {exc}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# Client side: find or start the store for a folder; connect


@dataclass
class EmbeddedStoreProcess:
    """A store this process started as its child; stopped when this process exits."""

    path: Path
    process: subprocess.Popen[bytes]
    info: StoreInfo
    owner_pid: int = field(default_factory=os.getpid)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then wait for the store to close its chdb session (SIGKILL after timeout)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        with contextlib.suppress(ValueError):
            _owned.remove(self)


_owned: list[EmbeddedStoreProcess] = []
_owned_lock = threading.Lock()


def owned_stores() -> list[EmbeddedStoreProcess]:
    """The stores this process started and has not stopped."""
    return [store for store in _owned if store.owner_pid == os.getpid()]


def stop_owned_stores(path: Path | None = None) -> None:
    """Stop the stores this process started (only the one for `path` when given)."""
    for store in owned_stores():
        if path is None or store.path == Path(path).resolve():
            store.stop()


atexit.register(stop_owned_stores)


def _log_tail(log_path: Path, offset: int, lines: int = 20) -> str:
    try:
        with log_path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


@contextlib.contextmanager
def _start_lock(path: Path, timeout_s: float) -> Iterator[None]:
    fd = os.open(path / START_LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"another process has been starting the store for {path} for more "
                        f"than {timeout_s:.0f} s; see {path / LOG_FILE}"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _spawn(path: Path, timeout_s: float) -> EmbeddedStoreProcess:
    log_path = path / LOG_FILE
    with log_path.open("ab") as log_file:
        offset = log_file.tell()
        env = dict(os.environ)
        # The child imports gpuledger the way this process did, installed or not.
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpuledger.store",
                str(path),
                "--owner-pid",
                str(os.getpid()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=env,
            # Ctrl-C stops the owner first; the owner stops the store after its last writes.
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while True:
        code = process.poll()
        if code is not None:
            raise StoreError(
                f"the store for {path} exited with code {code} while starting; "
                f"{log_path} says:\n{_log_tail(log_path, offset)}"
            )
        info = read_store_file(path)
        if info is not None and info.pid == process.pid and ping(info):
            return EmbeddedStoreProcess(path=path, process=process, info=info)
        if time.monotonic() > deadline:
            process.kill()
            process.wait(timeout=5)
            raise StoreError(
                f"the store for {path} did not answer within {timeout_s:.0f} s; "
                f"{log_path} says:\n{_log_tail(log_path, offset)}"
            )
        time.sleep(0.05)


def ensure_store(path: Path, *, start: bool = True, timeout_s: float = 30.0) -> StoreInfo:
    """The store serving chdb folder `path`: the live one, or (with `start`) a new child of this
    process. Processes racing to start one for the same folder end up sharing one."""
    path = Path(path).resolve()
    info = live_store(path)
    if info is not None:
        return info
    if not start:
        raise StoreError(
            f"no store serves {path}: start one with `gpuledger store {path}` "
            "or connect with start=True"
        )
    path.mkdir(parents=True, exist_ok=True)
    with _start_lock(path, timeout_s):
        info = live_store(path)  # another process may have started it while we waited
        if info is not None:
            return info
        store = _spawn(path, timeout_s)
        with _owned_lock:
            _owned.append(store)
        return store.info


@dataclass(frozen=True)
class StoreURL:
    """A parsed `GPULEDGER_STORE` value."""

    scheme: str  # chdb | clickhouse | clickhouses
    path: Path | None = None  # chdb folder
    host: str = ""
    port: int = 0
    username: str = "default"
    password: str = ""
    database: str = DEFAULT_DATABASE
    settings: dict[str, str] = field(default_factory=dict)


def redact_store_url(url: str) -> str:
    """The URL as logs and the console may show it: any password replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a store URL that cannot be parsed)"
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(name.lower() == "password" for name, _ in pairs):
        query = urlencode(
            [(n, "***" if n.lower() == "password" else v) for n, v in pairs], safe="*"
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def parse_store_url(url: str) -> StoreURL:
    """`chdb:///ABS/PATH` (or `chdb://relative/path`), `clickhouse://user:password@host:8123/db`,
    `clickhouses://…` (HTTPS). A server URL's database is `gpuledger` (the default when the
    URL names none): every table, view and query names it, so another name is refused."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "chdb":
        rest = url[len("chdb:") :]
        rest = rest[2:] if rest.startswith("//") else rest
        rest = unquote(rest.split("?", 1)[0])
        if not rest:
            raise ValueError(f"store URL {url!r} names no folder: use chdb:///ABSOLUTE/PATH")
        return StoreURL(scheme="chdb", path=Path(rest).expanduser().resolve())
    if scheme in ("clickhouse", "clickhouses"):
        parts = urlsplit(url)
        shown = redact_store_url(url)
        if not parts.hostname:
            raise ValueError(
                f"store URL {shown!r} names no host: use {scheme}://user:password@host:port/db"
            )
        default_port = 8443 if scheme == "clickhouses" else 8123
        database = unquote(parts.path.strip("/")) or DEFAULT_DATABASE
        if database != DEFAULT_DATABASE:
            raise ValueError(
                f"store URL {shown!r} names database {database!r}: gpuledger's tables live in "
                f"database {DEFAULT_DATABASE!r}, which its SQL names; end the URL with "
                f"/{DEFAULT_DATABASE} or name no database"
            )
        return StoreURL(
            scheme=scheme,
            host=parts.hostname,
            port=parts.port or default_port,
            username=unquote(parts.username or "default"),
            password=unquote(parts.password or ""),
            database=database,
            settings=dict(parse_qsl(parts.query)),
        )
    raise ValueError(
        f"store URL scheme {scheme or '(none)'!r} in {redact_store_url(url)!r} is not "
        "supported: use "
        "chdb:///ABSOLUTE/PATH (the embedded store) or "
        "clickhouse://user:password@host:8123/gpuledger (a ClickHouse server; clickhouses:// "
        "for HTTPS)"
    )


def connect(
    url: str, *, start: bool = True, database: str | None = None, **client_kwargs: Any
) -> Client:
    """A clickhouse-connect client for a store URL (see `parse_store_url`).

    For `chdb:///PATH` it connects to the store serving PATH, starting one as a child of this
    process when none answers and `start` is true (stopped when this process exits). The client
    is bound to `database` when given; otherwise to the server's default database, so that it
    works before migrations create `gpuledger` (qualify table names: `gpuledger.cost_facts`).
    Extra keyword arguments go to `clickhouse_connect.get_client`.
    """
    import clickhouse_connect

    target = parse_store_url(url)
    # One client may serve several threads: no server session, which would serialise them.
    client_kwargs.setdefault("autogenerate_session_id", False)
    if target.scheme == "chdb":
        assert target.path is not None
        info = ensure_store(target.path, start=start)
        client_kwargs.setdefault("compress", False)  # loopback: compression only costs CPU
        return clickhouse_connect.get_client(
            host=info.host,
            port=info.port,
            username=STORE_USER,
            password=read_secret(target.path),
            database=database,
            **client_kwargs,
        )
    if target.settings:
        client_kwargs["settings"] = {**target.settings, **client_kwargs.get("settings", {})}
    return clickhouse_connect.get_client(
        host=target.host,
        port=target.port,
        username=target.username,
        password=target.password,
        database=database,
        secure=target.scheme == "clickhouses",
        **client_kwargs,
    )


if __name__ == "__main__":
    sys.exit(main())
