"""The prices the analysts' answers use: the store's `prices` table (what the worker was
told on the prices topic), else the packaged price book; and the GPU specs that right-sizing
compares models by (`data/gpu_specs.csv`)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from typing import Any

from gpuledger.analysts.window import as_utc
from gpuledger.ledger.prices import PriceIndex
from gpuledger.schema.messages import PriceEntry, PricingModel
from gpuledger.schema.pricebook import load_price_book

_PRICES_SQL = """
SELECT p.provider, p.region, p.gpu_model, p.pricing_model, p.usd_per_gpu_hour,
    toFloat64(p.effective_from) AS effective_from
FROM gpuledger.prices AS p FINAL
ORDER BY p.provider, p.region, p.gpu_model, p.pricing_model, p.effective_from
"""

_MIG_PROFILE = re.compile(r"^(\d+)g\.(\d+(?:\.\d+)?)gb$", re.IGNORECASE)
GB = 10**9


@dataclass(frozen=True)
class PriceSource:
    entries: list[PriceEntry]
    where: str  # "the store's prices table" or "the packaged price book"

    def index(self) -> PriceIndex:
        return PriceIndex(self.entries)


def load_prices(client: Any) -> PriceSource:
    """The store's price book; the packaged one when nothing was ever published."""
    rows = client.query(_PRICES_SQL).result_rows
    entries = [
        PriceEntry(
            provider=provider,
            region=region,
            gpu_model=gpu_model,
            pricing_model=PricingModel(pricing_model),
            usd_per_gpu_hour=float(rate),
            effective_from=float(effective_from),
        )
        for provider, region, gpu_model, pricing_model, rate, effective_from in rows
        if pricing_model in PricingModel.__members__
    ]
    if entries:
        return PriceSource(entries, "the store's prices table")
    return PriceSource(load_price_book(), "the packaged price book (the prices table is empty)")


def epoch(when: datetime) -> float:
    return as_utc(when).timestamp()


@dataclass(frozen=True)
class MigProfile:
    name: str
    slices: int
    memory_gb: float


@dataclass(frozen=True)
class GpuSpec:
    gpu_model: str
    memory_gb: float
    tflops: float
    mig_profiles: tuple[MigProfile, ...]

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * GB


def parse_mig_profile(name: str) -> MigProfile | None:
    """`3g.40gb` -> 3 slices, 40 GB; None for a name of another shape."""
    match = _MIG_PROFILE.match(name.strip())
    if match is None:
        return None
    return MigProfile(name.strip(), int(match.group(1)), float(match.group(2)))


def load_gpu_specs(text: str | None = None) -> dict[str, GpuSpec]:
    """The packaged `gpu_specs.csv` (or CSV text in its columns), by gpu_model."""
    name = "gpu_specs.csv"
    if text is None:
        text = files("gpuledger.analysts").joinpath("data", name).read_text("utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    specs: dict[str, GpuSpec] = {}
    for number, row in enumerate(csv.DictReader(lines), start=2):
        try:
            memory_gb = float(row["memory_gb"])
            tflops = float(row["tflops"])
        except (TypeError, ValueError):
            raise ValueError(
                f"{name} row {number} ({row.get('gpu_model')}): memory_gb and tflops must be "
                f"numbers, got {row.get('memory_gb')!r} and {row.get('tflops')!r}"
            ) from None
        profiles = []
        for item in (row.get("mig_profiles") or "").split():
            profile = parse_mig_profile(item)
            if profile is None:
                raise ValueError(
                    f"{name} row {number} ({row['gpu_model']}): MIG profile {item!r} is not "
                    "of the form Ng.Mgb (e.g. 2g.20gb)"
                )
            profiles.append(profile)
        specs[row["gpu_model"]] = GpuSpec(row["gpu_model"], memory_gb, tflops, tuple(profiles))
    return specs
