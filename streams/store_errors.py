"""Which store errors pass and which never will: a pure decision, no I/O.

A transient error (the store away, a timeout, too many parts, memory) passes: the worker
backs off and retries, holding its place. A permanent one (a value the column cannot take,
a type or a parse error) fails the same way however often it is retried: the worker splits
the batch to find the rows that cause it, dead-letters them and stores the rest.

clickhouse-connect raises `DatabaseError` with ClickHouse's error code in its message for
what the server refused, and `DataError`, `ValueError`, `OverflowError`, `UnicodeEncodeError`
or `TypeError` for a value it could not serialise before sending anything: those are the
rows' fault, and permanent. Anything else, an unknown code included, is taken as
transient: retrying costs time, never data.
"""

from __future__ import annotations

import re
import struct

from clickhouse_connect.driver.exceptions import DatabaseError, DataError, OperationalError

PERMANENT_CODES: dict[int, str] = {
    6: "CANNOT_PARSE_TEXT",
    26: "CANNOT_PARSE_QUOTED_STRING",
    27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
    36: "BAD_ARGUMENTS",
    38: "CANNOT_PARSE_DATE",
    41: "CANNOT_PARSE_DATETIME",
    43: "ILLEGAL_TYPE_OF_ARGUMENT",
    53: "TYPE_MISMATCH",
    69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE",
    72: "CANNOT_PARSE_NUMBER",
    117: "INCORRECT_DATA",
    131: "TOO_LARGE_STRING_SIZE",
    190: "SIZES_OF_ARRAYS_DONT_MATCH",
    321: "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    349: "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN",
    395: "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO",
    407: "DECIMAL_OVERFLOW",
    469: "VIOLATED_CONSTRAINT",
}
"""ClickHouse error codes that a retry cannot cure: the data is at fault."""

TRANSIENT_CODES: dict[int, str] = {
    159: "TIMEOUT_EXCEEDED",
    164: "READONLY",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    209: "SOCKET_TIMEOUT",
    210: "NETWORK_ERROR",
    241: "MEMORY_LIMIT_EXCEEDED",
    242: "TABLE_IS_READ_ONLY",
    252: "TOO_MANY_PARTS",
    319: "UNKNOWN_STATUS_OF_INSERT",
    394: "QUERY_WAS_CANCELLED",
    425: "SYSTEM_ERROR",
    999: "KEEPER_EXCEPTION",
}
"""Codes that pass with time (any code not in `PERMANENT_CODES` is treated the same)."""

# Raised by the client while it serialises our rows, before anything is sent.
_CLIENT_SIDE = (
    DataError,
    ValueError,  # UnicodeEncodeError and a date out of Python's range among them
    OverflowError,
    TypeError,
    struct.error,
)
_CODE = re.compile(r"\bcode: (\d+)", re.IGNORECASE)


def error_code(exc: BaseException) -> int | None:
    """The ClickHouse error code an exception carries in its message, if any."""
    found = _CODE.search(str(exc))
    return int(found.group(1)) if found else None


def is_permanent(exc: BaseException) -> bool:
    """True when retrying `exc`'s call with the same rows fails the same way."""
    if isinstance(exc, OperationalError):
        return False  # the connection, not the data
    code = error_code(exc) if isinstance(exc, DatabaseError) else None
    if code is not None:
        return code in PERMANENT_CODES
    return isinstance(exc, _CLIENT_SIDE)


class PermanentStoreError(Exception):
    """A store call failed in a way no retry cures (`cause` says how)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
