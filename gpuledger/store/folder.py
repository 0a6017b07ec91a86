"""A store's folder: `store.json` (how clients find the process serving it), its password
file, its optional engine configuration, and whether the process named there is alive."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from gpuledger.store.door import (
    PASSWORD_ENV,
)

STORE_FILE = "store.json"
SECRET_FILE = "store.secret"  # the password of the store serving the folder, mode 0600
SANDBOX_DIR = "empty"  # the store's working folder, kept empty: relative paths reach nothing
START_LOCK_FILE = ".start.lock"
LOG_FILE = "store.log"
# A clickhouse-local configuration the store loads when the folder holds one (remote_servers,
# macros): written by the folder's owner, like everything in it.
CONFIG_FILE = "chdb.xml"
DEFAULT_DATABASE = "gpuledger"


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


class StoreError(RuntimeError):
    """The store cannot start, or cannot be reached."""


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


def write_store_file(path: Path, info: StoreInfo) -> None:
    target = store_file(path)
    tmp = target.with_name(f".{STORE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(info)) + "\n")
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


def write_secret(path: Path, secret: str) -> None:
    """Write the password readable by this user only: created with mode 0600 (never chmod-ed
    after, so it is never readable by others, not even for a moment), then renamed into place."""
    tmp = Path(path) / f".{SECRET_FILE}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    os.replace(tmp, secret_file(path))


def remove_secret(path: Path, secret: str) -> None:
    with contextlib.suppress(OSError):
        if secret_file(path).read_text().strip() == secret:
            secret_file(path).unlink()


def check_folder(path: Path) -> None:
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


def remove_store_file(path: Path, pid: int) -> None:
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
