"""The HTTP server in front of the engine: sessions, the request handler, serving a folder,
and `python -m gpuledger.store PATH`."""

from __future__ import annotations

import argparse
import dataclasses
import email.parser
import email.policy
import logging
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

from gpuledger.store.door import (
    ACCESS_DENIED,
    AUTHENTICATION_FAILED,
    PASSWORD_ENV,
    STORE_USER,
    Door,
    is_loopback,
    request_credentials,
)
from gpuledger.store.engine import ChdbEngine, Outcome
from gpuledger.store.folder import (
    SANDBOX_DIR,
    StoreError,
    StoreInfo,
    check_folder,
    pid_alive,
    remove_secret,
    remove_store_file,
    secret_file,
    write_secret,
    write_store_file,
)
from gpuledger.store.protocol import (
    CONTENT_TYPES,
    NOT_IMPLEMENTED,
    READ_KEYWORDS,
    READONLY,
    SYNTAX_ERROR,
    UNKNOWN_EXCEPTION,
    USE_STATEMENT,
    RequestParams,
    StoreRequestError,
    chunked_body,
    decompress_frames,
    http_status,
    output_format,
    parse_request_params,
    sized_body,
    split_insert,
    statement_keyword,
)

log = logging.getLogger("gpuledger.store")

_INSERT_BUFFER_BYTES = 64 << 20  # an insert body larger than this spools to disk
_APPEND_CHUNK_BYTES = 4 << 20
_HEAD_LIMIT_BYTES = 1 << 20  # an INSERT statement longer than this is read as plain SQL
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
            raw = chunked_body(self.rfile)
        else:
            raw = sized_body(self.rfile, int(self.headers.get("Content-Length") or 0))
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
        if params.readonly and keyword not in READ_KEYWORDS:
            raise StoreRequestError(READONLY, f"cannot execute {keyword} in readonly mode")
        if keyword == "SET":
            changed = server.engine.run_set(sql, database)
            if session is not None:
                session.settings.update(changed)
            self._answer(200, b"", self._headers(query_id, Outcome(), None))
            return
        if keyword == "USE":
            match = USE_STATEMENT.match(sql)
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
        shows_result = keyword in READ_KEYWORDS or bool(outcome.body)
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
            headers["Content-Type"] = CONTENT_TYPES.get(
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
    check_folder(path)
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
        write_secret(path, password)  # before store.json: a client that finds one finds both
        write_store_file(path, info)
        log.info("store serving %s on %s (chdb engine %s)", path, info.http_url, info.version)
        if ready is not None:
            ready(info)
        server.serve_forever(poll_interval=0.2)
    finally:
        remove_store_file(path, info.pid)
        remove_secret(path, password)
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
