"""Client side: find the store serving a folder, or start one as a child of this process (and
stop it when this process exits)."""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gpuledger.store.folder import (
    LOG_FILE,
    START_LOCK_FILE,
    StoreError,
    StoreInfo,
    live_store,
    ping,
    read_store_file,
)


def terminate(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM a child that still runs, and wait for it to exit (SIGKILL after timeout_s)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


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
        terminate(self.process, timeout_s)
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
        package_root = str(Path(__file__).resolve().parents[2])
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
