"""Store URLs (`chdb:///PATH`, `clickhouse://`, `clickhouses://`) and `connect`, which turns
one into a clickhouse-connect client."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from gpuledger.store.door import (
    STORE_USER,
)
from gpuledger.store.folder import DEFAULT_DATABASE, read_secret
from gpuledger.store.spawn import ensure_store

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client


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
