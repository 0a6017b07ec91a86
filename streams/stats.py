"""The worker's counters, and the line that reports them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gpuledger.schema.messages import LABEL_NORMALISATIONS


@dataclass
class WorkerStats:
    messages: int = 0
    samples: int = 0
    facts: int = 0
    duplicates: int = 0
    deadletters: int = 0
    corrections: int = 0
    corrected_rows: int = 0
    refused_by_store: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (
            f"{self.samples} samples ({self.samples / elapsed:,.0f}/s), {self.facts} facts, "
            f"{self.duplicates} duplicates dropped, {self.deadletters} dead letters "
            f"({self.refused_by_store} refused by the store), "
            f"{self.corrections} corrections ({self.corrected_rows} rows), "
            f"{LABEL_NORMALISATIONS.count} label values normalised"
        )
