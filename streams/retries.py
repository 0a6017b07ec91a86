"""Store calls that outlast a store outage: retried with backoff, the worker's place held.

A failure no retry cures (`is_permanent`) is raised at once where the caller asks, so that
it can find the rows at fault (`store_rows` splits a batch in halves to find them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from gpuledger.streams.deadletters import QUOTE_CHARS, bounded
from gpuledger.streams.store_errors import PermanentStoreError, is_permanent

log = logging.getLogger("gpuledger.worker")

# A worker that cannot store says so, with where it stands, at most this often.
STALL_REPORT_EVERY_S = 60.0


class StoreCalls:
    """Runs store calls in a thread, retrying them. `position()` says where the worker
    stands (for the stall report); once `stopping` is set, a call that keeps failing gives
    up after a few tries instead of holding the stop."""

    def __init__(self, stopping: asyncio.Event, position: Callable[[], str]) -> None:
        self.stopping = stopping
        self.position = position
        self._stall_reported = 0.0

    async def run(self, func: Callable[..., Any], *args: Any, permanent: bool = False) -> Any:
        """`func(*args)`, retried while it fails. `permanent`: a failure no retry cures
        raises `PermanentStoreError` at once; otherwise it is retried too. A call that keeps
        failing says so once a minute, with where the worker stands."""
        delay = 0.2
        failing_since: float | None = None
        while True:
            try:
                return await asyncio.to_thread(func, *args)
            except Exception as exc:
                if permanent and is_permanent(exc):
                    raise PermanentStoreError(exc) from exc
                if self.stopping.is_set() and delay > 5:
                    raise
                now = time.monotonic()
                failing_since = failing_since or now
                log.warning(
                    "store call %s failed (%s); retrying in %.1f s",
                    func.__name__,
                    bounded(str(exc), QUOTE_CHARS * 4),
                    delay,
                )
                if now - self._stall_reported >= STALL_REPORT_EVERY_S:
                    self._stall_reported = now
                    log.error(
                        "worker stalled for %.0f s: store call %s keeps failing; %s",
                        now - failing_since,
                        func.__name__,
                        self.position(),
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def store_rows(
        self,
        func: Callable[..., Any],
        items: Sequence[Any],
        refuse: Callable[[Any, Exception], None],
        *extra: Any,
        rows: Callable[[Sequence[Any]], Any] | None = None,
    ) -> None:
        """`func(rows(items), *extra)`, retried while the store fails transiently. A
        permanent failure splits the batch in halves until the items the store refuses
        are found: each goes to `refuse`, the rest are stored."""
        if not items:
            return
        try:
            await self.run(func, rows(items) if rows else items, *extra, permanent=True)
        except PermanentStoreError as exc:
            if len(items) == 1:
                refuse(items[0], exc)
                return
            half = len(items) // 2
            log.warning("the store refuses a batch of %d (%s): splitting it", len(items), exc)
            await self.store_rows(func, items[:half], refuse, *extra, rows=rows)
            await self.store_rows(func, items[half:], refuse, *extra, rows=rows)
