"""What the pipeline shares with the parts it delegates to (the metadata feed, the
corrections): one object, so that each part reads the same state, store calls and counters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpuledger.ledger.joiner import Joiner
    from gpuledger.ledger.state import MetadataState
    from gpuledger.schema.topics import Topics
    from gpuledger.streams.deadletters import DeadLetters
    from gpuledger.streams.observers import FactObserver
    from gpuledger.streams.retries import StoreCalls
    from gpuledger.streams.sink import FactSink
    from gpuledger.streams.stats import WorkerStats


@dataclass(frozen=True, eq=False)
class WorkerParts:
    topics: Topics
    state: MetadataState
    joiner: Joiner
    # The store's sink is opened when the worker starts, after the parts are made.
    sink: Callable[[], FactSink]
    calls: StoreCalls
    letters: DeadLetters
    stats: WorkerStats
    observers: list[FactObserver]
