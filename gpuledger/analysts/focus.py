"""The FOCUS 1.0 export (FinOps Open Cost and Usage Specification): one charge row per hour,
GPU (or MIG instance), job and price, in CSV or Parquet.

Mapping (docs/SQL.md, "FOCUS export"): the quantity is GPU-hours (of the MIG instance for
a MIG row); BilledCost = EffectiveCost = ContractedCost = what gpuledger charged;
ContractedUnitPrice is that cost per GPU-hour (a node's negotiated rate included); ListUnitPrice
is the price book's public rate for the row's SKU (on-demand for on-demand and reserved rows,
spot for spot rows), the charged rate where the book has none. PricingCategory: on_demand ->
Standard, spot -> Dynamic, reserved -> Committed (with the CommitmentDiscount columns).
SubAccount is the team. Tags carry team, project, job_type, experiment_id, model and
environment; `x_` columns carry what FOCUS lacks: the job, GPU model, MIG profile, node, mean
GPU utilization, idle cost and whether the price was missing.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from gpuledger.analysts.sql import WINDOW_ARGS, rows_as_dicts, window_params
from gpuledger.analysts.window import Window, as_utc
from gpuledger.ledger.cost import mig_fraction
from gpuledger.ledger.prices import PriceIndex
from gpuledger.schema.messages import JOB_TAGS
from gpuledger.schema.pricebook import GpuModelCatalog


class FocusFormat(StrEnum):
    csv = "csv"
    parquet = "parquet"


# The FOCUS 1.0 columns, in the specification's groups, then ours.
# The money columns, in FOCUS's order (decimals in the export).
COST_COLUMNS: tuple[str, ...] = (
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ListUnitPrice",
    "ContractedCost",
    "ContractedUnitPrice",
)
FOCUS_COLUMNS: tuple[str, ...] = (
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "InvoiceIssuerName",
    "ProviderName",
    "PublisherName",
    "SubAccountId",
    "SubAccountName",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    *COST_COLUMNS,
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "ConsumedQuantity",
    "ConsumedUnit",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "AvailabilityZone",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "SkuId",
    "SkuPriceId",
    "Tags",
)
EXTRA_COLUMNS: tuple[str, ...] = (
    "x_JobId",
    "x_GpuModel",
    "x_MigProfile",
    "x_Node",
    "x_GpuUtilization",
    "x_IdleCost",
    "x_PriceMissing",
)
# focus-validator 1.0.0 checks FOCUS 1.0 data for five columns under their 1.0-preview
# ids (InvoiceIssuer, Provider, Publisher, ResourceID, and ChargeType, which 1.0 renamed
# ChargeCategory): the export carries those too, with the same values, unless told not to.
LEGACY_COLUMNS: dict[str, str] = {
    "InvoiceIssuer": "InvoiceIssuerName",
    "Provider": "ProviderName",
    "Publisher": "PublisherName",
    "ResourceID": "ResourceId",
    "ChargeType": "ChargeCategory",
}
COLUMNS = FOCUS_COLUMNS + EXTRA_COLUMNS


def columns(legacy: bool = True) -> tuple[str, ...]:
    """The columns of an export, with or without the 1.0-preview aliases."""
    return COLUMNS + (tuple(LEGACY_COLUMNS) if legacy else ())


DATETIME_COLUMNS = frozenset(
    {"BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd"}
)
DECIMAL_COLUMNS = frozenset(
    {
        *COST_COLUMNS,
        "PricingQuantity",
        "ConsumedQuantity",
        "x_GpuUtilization",
        "x_IdleCost",
    }
)
BOOLEAN_COLUMNS = frozenset({"x_PriceMissing"})

PRICING_CATEGORY = {"on_demand": "Standard", "spot": "Dynamic", "reserved": "Committed"}
PROVIDER_NAMES = {
    "aws": "AWS",
    "gcp": "Google Cloud",
    "azure": "Microsoft Azure",
    "lambda": "Lambda",
    "coreweave": "CoreWeave",
    "*": "Unspecified",
}
GPU_HOURS = "GPU-Hours"
UNALLOCATED = "unallocated"
_TINY = 1e-12


@dataclass(frozen=True)
class BillingAccount:
    account_id: str = "gpuledger"
    account_name: str = "gpuledger GPU fleet"
    currency: str = "USD"


@dataclass(frozen=True)
class HourlyCharge:
    """One row of the `focus_hourly_charges` view."""

    hour: datetime
    gpu_uuid: str
    node: str
    gpu_model: str
    mig_profile: str
    job_id: str
    team: str
    project: str
    job_type: str
    experiment_id: str
    provider: str
    region: str
    pricing_model: str
    gpu_seconds: float
    cost_usd: float
    idle_cost_usd: float
    util_gpu_seconds: float
    util_sm_seconds: float
    price_missing_gpu_seconds: float
    model: str = ""
    environment: str = ""

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600.0

    @property
    def mean_util_sm(self) -> float | None:
        if self.util_gpu_seconds <= 1e-9:
            return None
        return self.util_sm_seconds / self.util_gpu_seconds


def _clean(value: float, digits: int = 10) -> float:
    """Drop the float residue of cancel and restate (1e-17 is a zero, not a charge)."""
    rounded = round(value, digits)
    return 0.0 if rounded == 0 else rounded


def _month_start(when: datetime) -> datetime:
    return when.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _next_month(when: datetime) -> datetime:
    start = _month_start(when)
    return (start + timedelta(days=32)).replace(day=1)


def provider_name(provider: str) -> str:
    return PROVIDER_NAMES.get(provider.lower(), provider)


def list_unit_price(
    charge: HourlyCharge, prices: PriceIndex, catalog: GpuModelCatalog
) -> float | None:
    """The book's public rate per GPU-hour of the row's SKU (None when the book has none)."""
    pricing = "spot" if charge.pricing_model == "spot" else "on_demand"
    entry = prices.lookup(
        charge.provider, charge.region, charge.gpu_model, pricing, as_utc(charge.hour).timestamp()
    )
    if entry is None:
        return None
    return entry.usd_per_gpu_hour * mig_fraction(charge.mig_profile, charge.gpu_model, catalog)


def focus_row(
    charge: HourlyCharge,
    window: Window,
    prices: PriceIndex,
    catalog: GpuModelCatalog,
    account: BillingAccount,
) -> dict[str, Any]:
    """One FOCUS charge row for an hourly charge."""
    hour = as_utc(charge.hour)
    period_start = max(hour, window.start)
    period_end = min(hour + timedelta(hours=1), window.end)
    quantity = _clean(charge.gpu_hours)
    billed = _clean(charge.cost_usd)
    contracted_unit = _clean(billed / quantity) if quantity > 0 else 0.0
    listed = list_unit_price(charge, prices, catalog)
    list_unit = _clean(listed) if listed is not None else contracted_unit
    committed = charge.pricing_model == "reserved"
    mig = charge.mig_profile
    sku = f"{charge.provider}:{charge.gpu_model}" + (f":{mig}" if mig else "")
    team = charge.team or UNALLOCATED
    what = f"{charge.gpu_model} {'MIG ' + mig + ' ' if mig else ''}GPU time on node {charge.node}"
    if charge.job_id:
        what += f" for job {charge.job_id}"
        if charge.team or charge.project:
            what += f" ({charge.team}/{charge.project})"
    else:
        what += ", unallocated"
    price_missing = charge.price_missing_gpu_seconds > 1e-9
    if price_missing:
        what += "; no price in the price book"
    # The job's tags the charge has become its FOCUS Tags, named as the fields.
    tags = {key: value for key in JOB_TAGS if (value := getattr(charge, key))}
    region = None if charge.region in ("", "*") else charge.region
    util = charge.mean_util_sm
    row: dict[str, Any] = {
        "BillingAccountId": account.account_id,
        "BillingAccountName": account.account_name,
        "BillingCurrency": account.currency,
        "BillingPeriodStart": _month_start(period_start),
        "BillingPeriodEnd": _next_month(period_start),
        "InvoiceIssuerName": provider_name(charge.provider),
        "ProviderName": provider_name(charge.provider),
        "PublisherName": provider_name(charge.provider),
        "SubAccountId": team,
        "SubAccountName": team,
        "ChargeCategory": "Usage",
        "ChargeClass": None,
        "ChargeDescription": what,
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodStart": period_start,
        "ChargePeriodEnd": period_end,
        "BilledCost": billed,
        "EffectiveCost": billed,
        "ListCost": _clean(list_unit * quantity),
        "ListUnitPrice": list_unit,
        "ContractedCost": billed,
        "ContractedUnitPrice": contracted_unit,
        "PricingCategory": PRICING_CATEGORY.get(charge.pricing_model, "Other"),
        "PricingQuantity": quantity,
        "PricingUnit": GPU_HOURS,
        "ConsumedQuantity": quantity,
        "ConsumedUnit": GPU_HOURS,
        "CommitmentDiscountCategory": "Usage" if committed else None,
        "CommitmentDiscountId": f"{sku}:{charge.region}:reserved" if committed else None,
        "CommitmentDiscountName": (
            f"{charge.gpu_model} reserved capacity ({charge.provider} {charge.region})"
            if committed
            else None
        ),
        "CommitmentDiscountStatus": "Used" if committed else None,
        "CommitmentDiscountType": "Reserved" if committed else None,
        "AvailabilityZone": None,
        "RegionId": region,
        "RegionName": region,
        "ResourceId": charge.gpu_uuid,
        "ResourceName": f"{charge.gpu_model} on {charge.node}" + (f" ({mig})" if mig else ""),
        "ResourceType": "GPU MIG instance" if mig else "GPU",
        "ServiceCategory": "Compute",
        "ServiceName": "GPU compute",
        "SkuId": sku,
        "SkuPriceId": f"{sku}:{charge.region}:{charge.pricing_model}",
        "Tags": json.dumps(tags, separators=(",", ":"), sort_keys=True),
        "x_JobId": charge.job_id or None,
        "x_GpuModel": charge.gpu_model,
        "x_MigProfile": mig or None,
        "x_Node": charge.node,
        "x_GpuUtilization": None if util is None else round(util, 6),
        "x_IdleCost": _clean(charge.idle_cost_usd),
        "x_PriceMissing": price_missing,
    }
    for alias, column in LEGACY_COLUMNS.items():
        row[alias] = row[column]
    return row


def focus_rows(
    charges: Iterable[HourlyCharge],
    window: Window,
    prices: PriceIndex,
    catalog: GpuModelCatalog,
    account: BillingAccount | None = None,
) -> list[dict[str, Any]]:
    """The FOCUS rows of some hourly charges; charges netted to nothing are left out."""
    account = account or BillingAccount()
    return [
        focus_row(charge, window, prices, catalog, account)
        for charge in charges
        if abs(charge.gpu_seconds) > 1e-9 or abs(charge.cost_usd) > _TINY
    ]


# -- I/O ---------------------------------------------------------------------------------

_CHARGES_SQL = f"""
SELECT hour, gpu_uuid, node, gpu_model, mig_profile, job_id, team, project, job_type,
    experiment_id, provider, region, pricing_model, gpu_seconds, cost_usd, idle_cost_usd,
    util_gpu_seconds, util_sm_seconds, price_missing_gpu_seconds, model, environment
FROM gpuledger.focus_hourly_charges({WINDOW_ARGS})
ORDER BY hour, node, gpu_uuid, job_id, pricing_model
"""


def fetch_charges(client: Any, window: Window) -> list[HourlyCharge]:
    result = client.query(_CHARGES_SQL, parameters=window_params(window))
    return [HourlyCharge(**row) for row in rows_as_dicts(result)]


def _csv_value(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in DATETIME_COLUMNS:
        return as_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")
    if column in BOOLEAN_COLUMNS:
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"FOCUS column {column}: {value!r} is not a finite number")
        return repr(value)
    return str(value)


def write_csv(rows: Sequence[dict[str, Any]], out: Path, *, legacy: bool = True) -> None:
    names = columns(legacy)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for row in rows:
            writer.writerow([_csv_value(c, row[c]) for c in names])


def write_parquet(rows: Sequence[dict[str, Any]], out: Path, *, legacy: bool = True) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def kind(column: str) -> Any:
        if column in DATETIME_COLUMNS:
            return pa.timestamp("ms", tz="UTC")
        if column in DECIMAL_COLUMNS:
            return pa.float64()
        if column in BOOLEAN_COLUMNS:
            return pa.bool_()
        return pa.string()

    names = columns(legacy)
    schema = pa.schema([pa.field(c, kind(c), nullable=True) for c in names])
    table = pa.table({c: [row[c] for row in rows] for c in names}, schema=schema)
    pq.write_table(table, out)


def format_for(out: Path, fmt: FocusFormat | None) -> FocusFormat:
    """The format asked for, else the one the file name ends with."""
    if fmt is not None:
        return fmt
    suffix = out.suffix.lower().lstrip(".")
    if suffix in FocusFormat.__members__:
        return FocusFormat(suffix)
    raise ValueError(
        f"--out {out.name!r}: cannot tell the format from the name; end it in .csv or "
        ".parquet, or give --format csv|parquet"
    )


@dataclass(frozen=True)
class ExportSummary:
    rows: int
    billed_cost: float
    list_cost: float
    gpu_hours: float
    path: Path
    fmt: FocusFormat


def export_focus(
    client: Any,
    window: Window,
    out: Path,
    *,
    fmt: FocusFormat | None,
    prices: PriceIndex,
    catalog: GpuModelCatalog,
    account: BillingAccount | None = None,
    legacy_columns: bool = True,
) -> ExportSummary:
    """Write the FOCUS rows of `window` to `out` and say what was written."""
    chosen = format_for(out, fmt)
    rows = focus_rows(fetch_charges(client, window), window, prices, catalog, account)
    out.parent.mkdir(parents=True, exist_ok=True)
    if chosen is FocusFormat.csv:
        write_csv(rows, out, legacy=legacy_columns)
    else:
        write_parquet(rows, out, legacy=legacy_columns)
    return ExportSummary(
        rows=len(rows),
        billed_cost=sum(r["BilledCost"] for r in rows),
        list_cost=sum(r["ListCost"] for r in rows),
        gpu_hours=sum(r["ConsumedQuantity"] for r in rows),
        path=out,
        fmt=chosen,
    )
