"""Child processes that never outlive the process that started them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def freeze(pid: int, timeout_s: float = 5.0) -> None:
    """SIGSTOP `pid` and return once every thread of it has stopped.

    `kill` only queues the stop: a thread running on another CPU goes on until its next
    interrupt (in a virtual machine, milliseconds), and may answer a request meanwhile.
    Where /proc is not there to ask, this returns once the signal is sent.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while not _stopped(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} did not stop within {timeout_s:g} s")
        time.sleep(0.001)


def _stopped(pid: int) -> bool:
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # gone, or no /proc
    for thread in threads:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            stat = Path(f"/proc/{pid}/task/{thread}/stat").read_text()
            if stat.rpartition(")")[2].split()[0] not in ("T", "t"):
                return False
    return True
