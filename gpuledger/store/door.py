"""The embedded store's door: who may talk to it, under which Host name, and which SQL it serves.

Pure decisions only; the store's HTTP handler and engine call them.

- Credentials: one user, `default`, and one password. The store writes the password to
  `PATH/store.secret` (mode 0600, beside `PATH/store.json`), which gpuledger's own clients read,
  so the owner needs no setup and every other user of the machine gets 401. The password is a
  fresh random one per store start unless `GPULEDGER_STORE_PASSWORD` configures one (then it is
  the one written to the file, and the one a remote client sends).
- Host: the `Host` header must name the loopback address the store listens on (or the address
  configured with `--host`), so that a web page reached through DNS rebinding gets 403.
- SQL: ClickHouse's own parser rewrites every statement into its canonical text
  (`formatQuery`: comments gone, escapes resolved, one statement only); `sql_refusal` then refuses
  what reaches outside the store's folder: table functions, table and database engines and
  dictionary sources that read or write files, URLs, other servers or processes, paths used as
  table names (the engine's default database also serves files by path), `INTO OUTFILE`,
  `FROM INFILE`, settings that name files, and `SYSTEM`, `BACKUP`, `RESTORE` and `ATTACH`.
  gpuledger's migrations use none of these, so the refusal holds for every client, the owner too.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.message import Message

STORE_USER = "default"
PASSWORD_ENV = "GPULEDGER_STORE_PASSWORD"

# ClickHouse error codes of a refusal.
ACCESS_DENIED = 497
AUTHENTICATION_FAILED = 516

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Door:
    """The password the store answers to and the Host names it accepts."""

    password: str
    listen_host: str
    port: int

    def admits(self, username: str | None, password: str | None) -> bool:
        """True when the request's credentials are the store's (compared in constant time)."""
        if username is None or password is None:
            return False
        user_ok = hmac.compare_digest(username.encode(), STORE_USER.encode())
        password_ok = hmac.compare_digest(password.encode(), self.password.encode())
        return user_ok and password_ok

    def host_allowed(self, host_header: str | None) -> bool:
        """True when the Host header names an address the store listens on, with its port.

        Loopback names always count; a non-loopback `--host` (which needs a password) counts
        too, and on a wildcard address (0.0.0.0, ::) any name does: the password guards it."""
        if not host_header:
            return False
        if self.listen_host in _WILDCARDS:
            return True
        name, port = split_host_header(host_header)
        if port is not None and port != self.port:
            return False
        allowed = set(_LOOPBACK_NAMES)
        if not is_loopback(self.listen_host):
            listen = self.listen_host
            allowed.add(f"[{listen}]" if ":" in listen else listen)
        return name.lower() in allowed


def split_host_header(value: str) -> tuple[str, int | None]:
    """`name:port` of a Host header (`[::1]:8123` keeps its brackets); port None when absent
    or unreadable (then it cannot match a port)."""
    value = value.strip()
    match = re.fullmatch(r"(\[[^\]]*\]|[^:]*)(?::(\d{1,5}))?", value)
    if match is None:
        return value, -1
    return match.group(1), int(match.group(2)) if match.group(2) else None


def request_credentials(
    headers: Mapping[str, str] | Message,
) -> tuple[str | None, str | None]:
    """The user and password a request sends: HTTP basic auth (what clickhouse-connect sends) or
    ClickHouse's `X-ClickHouse-User` / `X-ClickHouse-Key` headers."""
    authorization = headers.get("Authorization") or ""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() == "basic" and encoded:
        try:
            user, sep, password = (
                base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        return (user, password) if sep else (None, None)
    key = headers.get("X-ClickHouse-Key")
    if key is not None:
        return headers.get("X-ClickHouse-User") or STORE_USER, key
    return None, None


# --------------------------------------------------------------------------------------------
# SQL

# Table functions, table/database engines and dictionary sources that reach files, URLs, other
# servers or processes (names lower case; a name is refused as a call `name(` and after ENGINE =).
# A Distributed table is served: it reaches only the clusters of the folder's own engine
# configuration (`chdb.xml`, written by the folder's owner), and without one there are none.
_BLOCKED_NAMES = frozenset(
    {
        "file",
        "filecluster",
        "filelog",
        "filesystem",
        "url",
        "urlcluster",
        "gcs",
        "oss",
        "cosn",
        "cluster",
        "clusterallreplicas",
        "sqlite",
        "odbc",
        "jdbc",
        "hive",
        "disk",
        "backup",
        "embeddedrocksdb",
        "cassandra",
        "clickhouse",
        "yamlregexptree",
        "ytsaurus",
        "arrowflight",
        "replicated",
        "executable",
        "executablepool",
        "executable_pool",
        "kafka",
        "rabbitmq",
        "nats",
    }
)
_BLOCKED_PREFIXES = (
    "s3",
    "azure",
    "hdfs",
    "remote",
    "mysql",
    "postgres",
    "materializedmysql",
    "materializedpostgres",
    "iceberg",
    "deltalake",
    "hudi",
    "paimon",
    "mongo",
    "redis",
    "http",
    "python",
)
# Settings that name a file the engine reads or writes.
_FILE_SETTINGS = frozenset(
    {
        "format_schema",
        "format_schema_source",
        "format_template_resultset",
        "format_template_row",
        "output_format_schema",
    }
)
_REFUSED_STATEMENTS = frozenset({"SYSTEM", "BACKUP", "RESTORE", "ATTACH"})
_TOKEN = re.compile(
    r"'(?:[^'\\]|\\.|'')*'"  # string literal
    r"|`(?:[^`\\]|\\.|``)*`"  # quoted identifier
    r'|"(?:[^"\\]|\\.|"")*"'  # quoted identifier
    r"|[A-Za-z_][A-Za-z0-9_$]*"  # word
    r"|\S",
    re.DOTALL,
)


def blocked_name(name: str) -> bool:
    """True for a function or engine name that reaches outside the store."""
    lower = name.lower()
    return lower in _BLOCKED_NAMES or lower.startswith(_BLOCKED_PREFIXES)


def setting_refusal(names: Iterable[str]) -> str | None:
    """Why a request's settings are refused (one names a file), or None."""
    for name in names:
        if name.lower() in _FILE_SETTINGS:
            return f"setting {name} names a file; the embedded store does not serve it"
    return None


@dataclass(frozen=True)
class _Token:
    text: str
    kind: str  # word | quoted | string | punct

    @property
    def name(self) -> str | None:
        """The identifier or keyword this token is (quotes removed), None for the rest."""
        if self.kind == "word":
            return self.text
        if self.kind == "quoted":
            return re.sub(r"\\(.)", r"\1", self.text[1:-1])
        return None


def _tokens(sql: str) -> list[_Token]:
    out: list[_Token] = []
    for match in _TOKEN.finditer(sql):
        text = match.group(0)
        first = text[0]
        kind = (
            "string"
            if first == "'"
            else "quoted"
            if first in '`"'
            else "word"
            if first.isalpha() or first == "_"
            else "punct"
        )
        out.append(_Token(text, kind))
    return out


def sql_refusal(canonical: str) -> str | None:
    """Why the store refuses a statement, or None when it serves it.

    `canonical` is the statement as ClickHouse's `formatQuery` rewrites it (one statement, no
    comments, escapes resolved), so case, comments, quoting and escapes cannot hide a name."""
    tokens = _tokens(canonical)
    words = [t.text.upper() for t in tokens if t.kind == "word"]
    if words and words[0] in _REFUSED_STATEMENTS:
        return f"{words[0]} statements are not served by the embedded store"
    for i, token in enumerate(tokens):
        name = token.name
        if name is None:
            continue
        after = tokens[i + 1].text if i + 1 < len(tokens) else ""
        before = [t.text.upper() for t in tokens[max(0, i - 2) : i]]
        if after == "(" and blocked_name(name):
            return f"{name}() reaches outside the store (files, URLs, servers or processes)"
        if blocked_name(name) and (before[-1:] == ["ENGINE"] or before == ["ENGINE", "="]):
            return f"ENGINE = {name} reaches outside the store (files, URLs, servers or processes)"
        if token.kind == "quoted" and "/" in name:
            return f"{token.text} is a file path; the store serves tables only"
        if token.kind == "word":
            upper = name.upper()
            if upper in ("OUTFILE", "INFILE") and before[-1:] in (["INTO"], ["FROM"]):
                return f"{before[-1]} {upper} reaches the file system; read the result instead"
        refused = setting_refusal([name])
        if refused is not None:
            return refused
    return None
