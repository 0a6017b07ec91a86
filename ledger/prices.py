"""The price book in memory (ARCHITECTURE.md §4.2): the most specific entry in effect at a time.

Pure: the worker and the analysts fill it from parsed `PriceEntry` messages.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator
from typing import Any

from gpuledger.schema.messages import PriceEntry, PricingModel
from gpuledger.schema.pricebook import WILDCARD

# Enum `.value` is a descriptor call; the hot loop reads these plain strings instead (a
# StrEnum member and its value are the same key).
PRICING_VALUE: dict[Any, str] = {m: m.value for m in PricingModel}


class _Series:
    """One price key's entries, ordered by effective_from."""

    __slots__ = ("entries", "starts")

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.entries: list[PriceEntry] = []

    def put(self, entry: PriceEntry) -> PriceEntry | None:
        i = bisect.bisect_left(self.starts, entry.effective_from)
        if i < len(self.starts) and self.starts[i] == entry.effective_from:
            replaced = self.entries[i]
            self.entries[i] = entry
            return replaced
        self.starts.insert(i, entry.effective_from)
        self.entries.insert(i, entry)
        return None

    def at(self, t: float) -> PriceEntry | None:
        i = bisect.bisect_right(self.starts, t)
        return self.entries[i - 1] if i else None


def _pricing_key(pricing_model: PricingModel | str) -> str:
    return PRICING_VALUE.get(pricing_model, pricing_model)


class PriceIndex:
    """The price book in memory, for §4.2 lookups per sample.

    Entries with the same key (provider, region, gpu_model, pricing_model, effective_from)
    replace each other, the last added winning, as on the compacted `prices` topic.
    """

    def __init__(self, entries: Iterable[PriceEntry] = ()) -> None:
        self._series: dict[tuple[str, str], dict[tuple[str, str], _Series]] = {}
        self._count = 0
        # The worker asks per sample; the answer holds for a span of time (until the next
        # entry of its series, or of a more specific one): remember it per place and model.
        self._spans: dict[tuple[str, str, str, str], tuple[float, float, PriceEntry | None]] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: PriceEntry) -> PriceEntry | None:
        """Add or replace an entry; returns the entry it replaced, if any."""
        self._spans.clear()
        by_place = self._series.setdefault((entry.gpu_model, entry.pricing_model.value), {})
        series = by_place.setdefault((entry.provider, entry.region), _Series())
        replaced = series.put(entry)
        if replaced is None:
            self._count += 1
        return replaced

    def lookup(
        self,
        provider: str,
        region: str,
        gpu_model: str,
        pricing_model: PricingModel | str,
        t: float,
    ) -> PriceEntry | None:
        """The most specific entry (provider+region, provider+*, *+*) in effect at t."""
        key = (provider, region, gpu_model, _pricing_key(pricing_model))
        span = self._spans.get(key)
        if span is not None and span[0] <= t < span[1]:
            return span[2]
        entry, since, until = self.lookup_span(*key, t)
        if len(self._spans) < 100_000:
            self._spans[key] = (since, until, entry)
        return entry

    def lookup_span(
        self,
        provider: str,
        region: str,
        gpu_model: str,
        pricing_model: PricingModel | str,
        t: float,
    ) -> tuple[PriceEntry | None, float, float]:
        """What `lookup` answers at t, and the span [since, until) around t it stays so."""
        by_place = self._series.get((gpu_model, _pricing_key(pricing_model)))
        if by_place is None:
            return None, -math.inf, math.inf
        until = math.inf
        for place in ((provider, region), (provider, WILDCARD), (WILDCARD, WILDCARD)):
            series = by_place.get(place)
            if series is None:
                continue
            i = bisect.bisect_right(series.starts, t)
            if i:
                if i < len(series.starts):
                    until = min(until, series.starts[i])
                return series.entries[i - 1], series.starts[i - 1], until
            # Nothing here yet at t: this more specific place takes over at its first entry.
            until = min(until, series.starts[0])
        return None, -math.inf, until

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[PriceEntry]:
        for by_place in self._series.values():
            for series in by_place.values():
                yield from series.entries
