"""The engine: one chdb Session behind one lock, with per-request settings undone after each
request, and chdb's swallowed insert errors raised (docs/ARCHITECTURE.md §5)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuledger.store.door import (
    ACCESS_DENIED,
    setting_refusal,
    sql_refusal,
)
from gpuledger.store.folder import CONFIG_FILE, StoreError
from gpuledger.store.protocol import (
    ABORTED,
    StoreRequestError,
    error_code,
    exception_text,
    sql_identifier,
    sql_string,
)

_ERROR_COUNTS = "SELECT code, value FROM system.errors WHERE value > 0"
"""The engine's error counters (errors of this process since it started)."""


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
        config = path / CONFIG_FILE
        target = f"{path}?config-file={config}" if config.is_file() else str(path)
        try:
            self._session: Any = Session(target)
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
