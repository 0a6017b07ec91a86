"""The price book and the GPU model catalogue: data files under `schema/data/`, validated here.

`price_book.csv` (or a user file in the same format, or JSON lines of `PriceEntry` objects)
becomes a list of `PriceEntry`; `gpu_models.csv` maps NVML product names to the canonical
`gpu_model` names of ARCHITECTURE.md §2 and says how many MIG slices each model has. Every bad line
raises `PriceBookError` naming the file, the line, the field, the value and what to do.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from pydantic import ValidationError

from gpuledger.schema.messages import PriceEntry, PricingModel

PRICE_BOOK_COLUMNS = (
    "provider",
    "region",
    "gpu_model",
    "pricing_model",
    "usd_per_gpu_hour",
    "effective_from",
    "source",
    "read_on",
)
_REQUIRED_PRICE_COLUMNS = ("provider", "region", "gpu_model", "pricing_model", "usd_per_gpu_hour")
GPU_MODEL_COLUMNS = ("pattern", "gpu_model", "mig_slices")
WILDCARD = "*"
_MAX_LABEL = 256
_GPU_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PriceBookError(ValueError):
    """A bad line in a price book or GPU model catalogue file."""

    def __init__(
        self, file: str, line: int | None, field: str | None, value: object, problem: str
    ) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.value = value
        self.problem = problem
        where = file if line is None else f"{file} line {line}"
        what = f"{field} {problem}" if field else problem
        super().__init__(f"{where}: {what}, got {value!r}")


# --- GPU model catalogue ------------------------------------------------------------------


@dataclass(frozen=True)
class GpuModelPattern:
    pattern: re.Pattern[str]
    gpu_model: str
    mig_slices: int | None


class GpuModelCatalog:
    """NVML product name -> canonical gpu_model, first matching pattern wins."""

    def __init__(self, patterns: Sequence[GpuModelPattern]) -> None:
        self.patterns: tuple[GpuModelPattern, ...] = tuple(patterns)
        self.models: frozenset[str] = frozenset(p.gpu_model for p in self.patterns)
        self._slices: dict[str, int | None] = {}
        for p in self.patterns:
            self._slices.setdefault(p.gpu_model, p.mig_slices)
        # A fleet has a handful of product names: remember each answer, the worker asks per sample.
        self._memo: dict[str, str | None] = {}

    def model_for(self, product_name: str) -> str | None:
        """The canonical model for an NVML product name, or None when no pattern matches."""
        try:
            return self._memo[product_name]
        except KeyError:
            pass
        found = next((p.gpu_model for p in self.patterns if p.pattern.search(product_name)), None)
        if len(self._memo) < 4096:
            self._memo[product_name] = found
        return found

    def mig_slices(self, gpu_model: str) -> int | None:
        """Compute slices of a MIG-capable model (7 for A100/H100/...), None if no MIG."""
        return self._slices.get(gpu_model)


def _read_text(path: Path | None, default_name: str) -> tuple[str, str]:
    if path is None:
        packaged = files("gpuledger.schema").joinpath("data").joinpath(default_name)
        return packaged.read_text("utf-8-sig"), default_name
    try:
        return Path(path).read_text("utf-8-sig"), Path(path).name
    except OSError as exc:
        raise PriceBookError(
            str(path), None, None, str(path), f"cannot be read ({exc.strerror}); check the path"
        ) from exc


def _data_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of lines that are neither blank nor `#` comments."""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield number, line


def _csv_rows(
    text: str, name: str, columns: Sequence[str], required: Sequence[str]
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, {column: value}) for each data row of a commented CSV file."""
    lines = _data_lines(text)
    first = next(lines, None)
    if first is None:
        raise PriceBookError(name, None, None, "", f"has no header; expected {','.join(columns)}")
    header_line, header_text = first
    header = [h.strip() for h in next(csv.reader([header_text]))]
    for column in header:
        if column not in columns:
            raise PriceBookError(
                name, header_line, "column", column, f"is unknown; expected {','.join(columns)}"
            )
    for column in required:
        if column not in header:
            raise PriceBookError(
                name, header_line, "column", column, "is missing from the header; add it"
            )
    for number, line in lines:
        values = [v.strip() for v in next(csv.reader([line]))]
        if len(values) != len(header):
            raise PriceBookError(
                name,
                number,
                None,
                line,
                f"has {len(values)} fields where the header has {len(header)}; "
                "quote values that contain commas",
            )
        yield number, dict(zip(header, values, strict=True))


def parse_gpu_models(text: str, name: str = "gpu_models.csv") -> GpuModelCatalog:
    """Parse a GPU model catalogue (`pattern,gpu_model,mig_slices`) from text."""
    patterns: list[GpuModelPattern] = []
    slices_of: dict[str, tuple[int | None, int]] = {}
    for number, row in _csv_rows(text, name, GPU_MODEL_COLUMNS, GPU_MODEL_COLUMNS):
        try:
            pattern = re.compile(row["pattern"], re.IGNORECASE)
        except re.error as exc:
            raise PriceBookError(
                name, number, "pattern", row["pattern"], f"is not a valid regex ({exc})"
            ) from exc
        if not row["pattern"]:
            raise PriceBookError(name, number, "pattern", "", "must not be empty")
        gpu_model = row["gpu_model"]
        if not _GPU_MODEL_NAME.match(gpu_model):
            raise PriceBookError(
                name,
                number,
                "gpu_model",
                gpu_model,
                "must be 1-64 letters, digits, '.', '_' or '-' (e.g. A100-80GB)",
            )
        mig_slices: int | None = None
        if row["mig_slices"]:
            try:
                mig_slices = int(row["mig_slices"])
            except ValueError:
                mig_slices = -1
            if not 1 <= mig_slices <= 16:
                raise PriceBookError(
                    name,
                    number,
                    "mig_slices",
                    row["mig_slices"],
                    "must be a whole number 1-16, or empty where MIG is not supported",
                )
        known = slices_of.setdefault(gpu_model, (mig_slices, number))
        if known[0] != mig_slices:
            raise PriceBookError(
                name,
                number,
                "mig_slices",
                row["mig_slices"],
                f"differs from line {known[1]} for {gpu_model} ({known[0]}); make them agree",
            )
        patterns.append(GpuModelPattern(pattern, gpu_model, mig_slices))
    return GpuModelCatalog(patterns)


def load_gpu_models(path: Path | None = None) -> GpuModelCatalog:
    """Load the GPU model catalogue: the packaged `gpu_models.csv` unless a path is given."""
    text, name = _read_text(path, "gpu_models.csv")
    return parse_gpu_models(text, name)


# --- price book ---------------------------------------------------------------------------


def _parse_label(name: str, number: int, field: str, value: str) -> str:
    if not value:
        raise PriceBookError(name, number, field, value, "must not be empty (use * for any)")
    if len(value) > _MAX_LABEL:
        raise PriceBookError(name, number, field, value, f"must be at most {_MAX_LABEL} characters")
    return value


def _parse_price(name: str, number: int, value: str) -> float:
    try:
        price = float(value)
    except ValueError:
        price = math.nan
    if not math.isfinite(price):
        raise PriceBookError(
            name, number, "usd_per_gpu_hour", value, "must be a finite number of USD, e.g. 2.99"
        )
    if price < 0:
        raise PriceBookError(name, number, "usd_per_gpu_hour", price, "must be >= 0")
    return price


def _parse_effective_from(name: str, number: int, value: str) -> float:
    """Epoch seconds, or an ISO-8601 date/time (UTC unless it carries an offset); empty = 0."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            raise PriceBookError(
                name,
                number,
                "effective_from",
                value,
                "must be epoch seconds or an ISO date such as 2025-06-01 (UTC)",
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = when.timestamp()
    if not math.isfinite(seconds) or seconds < 0:
        raise PriceBookError(
            name, number, "effective_from", value, "must be >= 0 (0 = always in effect)"
        )
    return seconds


def _csv_price_entries(text: str, name: str) -> Iterator[tuple[int, PriceEntry]]:
    for number, row in _csv_rows(text, name, PRICE_BOOK_COLUMNS, _REQUIRED_PRICE_COLUMNS):
        try:
            pricing_model = PricingModel(row["pricing_model"])
        except ValueError:
            raise PriceBookError(
                name,
                number,
                "pricing_model",
                row["pricing_model"],
                f"must be one of {', '.join(m.value for m in PricingModel)}",
            ) from None
        yield (
            number,
            PriceEntry(
                provider=_parse_label(name, number, "provider", row["provider"]),
                region=_parse_label(name, number, "region", row["region"]),
                gpu_model=_parse_label(name, number, "gpu_model", row["gpu_model"]),
                pricing_model=pricing_model,
                usd_per_gpu_hour=_parse_price(name, number, row["usd_per_gpu_hour"]),
                effective_from=_parse_effective_from(name, number, row.get("effective_from", "")),
            ),
        )


def _jsonl_price_entries(text: str, name: str) -> Iterator[tuple[int, PriceEntry]]:
    for number, line in _data_lines(text):
        try:
            yield number, PriceEntry.model_validate_json(line)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or None
            value = error.get("input")
            if isinstance(value, dict) and field in value:
                value = value[field]
            raise PriceBookError(
                name, number, field, value, f"is refused: {error['msg']}; fix this PriceEntry"
            ) from None


def parse_price_book(
    text: str, name: str = "price_book.csv", *, catalog: GpuModelCatalog | None = None
) -> list[PriceEntry]:
    """Parse a price book from text: CSV with a header, or JSON lines of `PriceEntry` objects.

    The format is told by the first line that is not blank or a `#` comment (`{` = JSON lines).
    Beyond the message's own checks: gpu_model must be in the catalogue, a provider `*` needs
    region `*` (the lookup never asks for `*`/region), and a key may appear only once.
    """
    catalog = catalog if catalog is not None else load_gpu_models()
    first = next(_data_lines(text), (0, ""))[1].lstrip()
    rows: Iterable[tuple[int, PriceEntry]] = (
        _jsonl_price_entries(text, name)
        if first.startswith("{")
        else _csv_price_entries(text, name)
    )
    entries: list[PriceEntry] = []
    seen: dict[str, int] = {}
    for number, entry in rows:
        for field in ("provider", "region"):
            _parse_label(name, number, field, getattr(entry, field))
        if entry.gpu_model not in catalog.models:
            raise PriceBookError(
                name,
                number,
                "gpu_model",
                entry.gpu_model,
                f"is not in the GPU model catalogue; use one of {', '.join(sorted(catalog.models))}"
                " or add a pattern for it to gpu_models.csv",
            )
        if entry.provider == WILDCARD and entry.region != WILDCARD:
            raise PriceBookError(
                name,
                number,
                "region",
                entry.region,
                "must be * when provider is * (name the provider for a regional price)",
            )
        earlier = seen.setdefault(entry.key, number)
        if earlier != number:
            raise PriceBookError(
                name,
                number,
                None,
                entry.key,
                f"repeats the price key of line {earlier}; keep one of the two lines",
            )
        entries.append(entry)
    return entries


def load_price_book(
    path: Path | None = None, *, catalog: GpuModelCatalog | None = None
) -> list[PriceEntry]:
    """Load a price book: the packaged `price_book.csv` unless a path is given.

    A given file is CSV in the packaged book's columns (`source` and `read_on` optional, `#`
    comment lines allowed) or JSON lines of `PriceEntry` objects.
    """
    text, name = _read_text(path, "price_book.csv")
    return parse_price_book(text, name, catalog=catalog)


# --- endpoint values ----------------------------------------------------------------------

ENDPOINT_VALUE_COLUMNS = ("endpoint", "usd_per_1k_requests", "effective_from", "note")


@dataclass(frozen=True)
class EndpointValue:
    """What 1,000 requests to an inference endpoint (its job id) are worth, from a time on."""

    endpoint: str
    usd_per_1k_requests: float
    effective_from: float  # epoch seconds; 0 = always
    note: str = ""


def parse_endpoint_values(text: str, name: str = "values.csv") -> list[EndpointValue]:
    """Parse `endpoint,usd_per_1k_requests[,effective_from][,note]` CSV: the revenue (or value)
    of 1,000 requests per endpoint, effective-dated. An endpoint and time may appear once."""
    values: list[EndpointValue] = []
    seen: dict[tuple[str, float], int] = {}
    required = ("endpoint", "usd_per_1k_requests")
    for number, row in _csv_rows(text, name, ENDPOINT_VALUE_COLUMNS, required):
        endpoint = row["endpoint"]
        if not endpoint or endpoint == WILDCARD or len(endpoint) > _MAX_LABEL:
            raise PriceBookError(
                name, number, "endpoint", endpoint, "must be the inference job's id (1-256 chars)"
            )
        try:
            usd = float(row["usd_per_1k_requests"])
        except ValueError:
            usd = math.nan
        if not math.isfinite(usd) or usd < 0:
            raise PriceBookError(
                name,
                number,
                "usd_per_1k_requests",
                row["usd_per_1k_requests"],
                "must be a finite number of USD >= 0, e.g. 0.40",
            )
        since = _parse_effective_from(name, number, row.get("effective_from", ""))
        first = seen.setdefault((endpoint, since), number)
        if first != number:
            raise PriceBookError(
                name,
                number,
                "effective_from",
                row.get("effective_from", ""),
                f"repeats line {first} for endpoint {endpoint}; keep one of them",
            )
        values.append(EndpointValue(endpoint, usd, since, row.get("note", "")))
    if not values:
        raise PriceBookError(name, None, None, "", "has no endpoint values")
    return values


def load_endpoint_values(path: Path) -> list[EndpointValue]:
    text, name = _read_text(path, "")
    return parse_endpoint_values(text, name)
