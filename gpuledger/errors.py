"""What the command line tells a user when a command fails: one line, the fix, an exit code.

No traceback reaches a user: every failure becomes one line saying what failed and which
setting or command fixes it. `GPULEDGER_DEBUG=1` prints the traceback as well.

Exit codes (the same for every sub-command):

- 1: the command ran and failed (a query the store refused, a check that found problems);
- 2: bad usage or bad input (a flag, a file, a setting);
- 3: a peer could not be reached or is not set up (the store, the broker, a cluster);
- 4: a publishing command sent only part of its records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_PARTIAL = 4

UNKNOWN_TABLE = 60
UNKNOWN_DATABASE = 81
_CODE = re.compile(r"\bcode: (\d+)", re.IGNORECASE)
_EXCEPTION = re.compile(r"DB::Exception: (.*)", re.DOTALL)
_TAIL = re.compile(r"\s*\((?:version [^)]*|for url [^)]*)\)")
_URL = re.compile(r"\(?(https?://[^\s)]+)\)?")
# clickhouse-connect appends the output format to a query before sending it.
_FORMAT_SUFFIX = re.compile(r"\s+FORMAT (?:Native|Arrow|JSON\w*|TabSeparated\w*)\b")


@dataclass(frozen=True)
class Failure:
    message: str
    exit_code: int


def store_message(exc: BaseException) -> str:
    """A ClickHouse error as the store's own sentence, without the client's wrapping
    (its URL, its version, the `FORMAT Native` it appended to the user's SQL)."""
    text = " ".join(str(exc).split())
    found = _EXCEPTION.search(text)
    if found:
        text = found.group(1)
    text = _TAIL.sub("", text)
    return _FORMAT_SUFFIX.sub("", text).strip()


def store_code(exc: BaseException) -> int | None:
    found = _CODE.search(str(exc))
    return int(found.group(1)) if found else None


def explain(exc: BaseException) -> Failure | None:
    """The one line for a failure a user can act on; None for one that is ours (a bug)."""
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
    from kafka.errors import KafkaError

    from gpuledger.agents.runner import AgentError
    from gpuledger.agents.sim.libnvml.build import BuildError
    from gpuledger.agents.spool import SpoolError
    from gpuledger.broker import BrokerError, PortTaken
    from gpuledger.runtime import PublishError
    from gpuledger.schema.migrate import MigrationError
    from gpuledger.store import StoreError

    if isinstance(exc, PublishError):
        # Nothing acknowledged: the broker was away; some: the rest may be sent again.
        exit_code = EXIT_UNREACHABLE if exc.failed == exc.total else EXIT_PARTIAL
        return Failure(
            f"{exc} (is the broker at GPULEDGER_BOOTSTRAP up? Sending the same records "
            "again is safe: the worker counts a record once)",
            exit_code,
        )
    if isinstance(exc, OperationalError):
        where = _URL.search(str(exc))
        at = f" at {where.group(1)}" if where else ""
        return Failure(
            f"cannot reach the ClickHouse store{at}: {_reason(exc)}. Set GPULEDGER_STORE "
            "(or --store) to a running store, or start the embedded one with `gpuledger up`",
            EXIT_UNREACHABLE,
        )
    if isinstance(exc, DatabaseError):
        code = store_code(exc)
        if code in (UNKNOWN_TABLE, UNKNOWN_DATABASE):
            return Failure(
                f"the store has no gpuledger schema yet ({store_message(exc)}): "
                "run `gpuledger db migrate` (or start `gpuledger up`, which migrates)",
                EXIT_UNREACHABLE,
            )
        return Failure(f"the store refused it: {store_message(exc)}", EXIT_FAILED)
    if isinstance(exc, StoreError):
        return Failure(f"store: {exc}", EXIT_UNREACHABLE)
    if isinstance(exc, PortTaken):
        return Failure(f"Kafka: {exc}", EXIT_USAGE)
    if isinstance(exc, BrokerError):
        return Failure(
            f"Kafka: {exc} (set GPULEDGER_BOOTSTRAP to a running broker, or use `gpuledger up`)",
            EXIT_UNREACHABLE,
        )
    if isinstance(exc, MigrationError):
        return Failure(f"migration: {exc}", EXIT_FAILED)
    if isinstance(exc, AgentError | SpoolError | BuildError):
        return Failure(f"agent: {exc}", EXIT_USAGE)
    if isinstance(exc, KafkaError):
        reason = str(exc).removeprefix(f"{type(exc).__name__}: ")
        return Failure(
            f"Kafka: {type(exc).__name__}: {reason} (is the broker running? "
            "Set GPULEDGER_BOOTSTRAP, or use `gpuledger up`)",
            EXIT_UNREACHABLE,
        )
    if type(exc).__name__ == "ConfigException" and type(exc).__module__.startswith("kubernetes"):
        return Failure(
            f"Kubernetes: {exc} (run inside a cluster, or point KUBECONFIG at a kubeconfig)",
            EXIT_UNREACHABLE,
        )
    if isinstance(exc, ValueError | OSError):
        return Failure(f"{type(exc).__name__}: {exc}", EXIT_USAGE)
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for marker, reason in (
        ("Connection refused", "connection refused"),
        ("Failed to resolve", "host name not found"),
        ("Name or service not known", "host name not found"),
        ("timed out", "timed out"),
    ):
        if marker in text:
            return reason
    return " ".join(text.split())[:200]
