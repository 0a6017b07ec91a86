"""The pure pieces of ClickHouse's HTTP interface that the store serves: request parameters,
statement keywords, INSERT heads, error codes and statuses, and request bodies (chunked
transfer, every compressed frame)."""

from __future__ import annotations

import contextlib
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from gpuledger.store.door import (
    ACCESS_DENIED,
    AUTHENTICATION_FAILED,
)

# ClickHouse error codes the store raises itself.
UNKNOWN_EXCEPTION = 1002
NOT_IMPLEMENTED = 48
SYNTAX_ERROR = 62
UNKNOWN_SETTING = 115
READONLY = 164
ABORTED = 236
STD_EXCEPTION = 1001


class StoreRequestError(Exception):
    """A request the store answers with a ClickHouse exception."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


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
READ_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS", "("})
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
USE_STATEMENT = re.compile(
    r"^\s*USE\s+(`(?:[^`\\]|\\.)+`|\"(?:[^\"\\]|\\.)+\"|[A-Za-z0-9_]+)\s*;?\s*$", re.I
)

CONTENT_TYPES = {
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


def chunked_body(rfile: BinaryIO | Any) -> Iterator[bytes]:
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
        yield from sized_body(rfile, size)
        rfile.readline(3)


def sized_body(rfile: BinaryIO | Any, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining:
        piece = rfile.read(min(remaining, 1 << 20))
        if not piece:
            raise StoreRequestError(STD_EXCEPTION, "the request body ended early")
        remaining -= len(piece)
        yield piece
