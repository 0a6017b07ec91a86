"""`gpuledger export focus`: a FOCUS 1.0 file the FinOps Foundation's validator accepts, and
whose charges add up to the cost facts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from clickhouse_connect.driver.client import Client
from typer.testing import CliRunner

from gpuledger.analysts.focus import (
    COLUMNS,
    FOCUS_COLUMNS,
    LEGACY_COLUMNS,
    BillingAccount,
    HourlyCharge,
    focus_row,
)
from gpuledger.analysts.window import Window
from gpuledger.cli import app
from gpuledger.ledger.prices import PriceIndex
from gpuledger.schema.pricebook import load_gpu_models
from tests.analysts.seed import DAY, T0, TEST_PRICES

ROOT = Path(__file__).resolve().parents[2]
FOCUS_VENV_HELP = (
    "python3.11 -m venv .venv-focus && .venv-focus/bin/pip install "
    "'focus-validator==1.0.0' 'multimethod==1.10' 'pyarrow==19.0.1'"
)
TWO_WEEKS = ["--from", "2026-11-02", "--to", "2026-11-16"]


def focus_validator() -> tuple[Path, Path]:
    """The validator's entry point and the folder it must run from (it reads
    `focus_validator/utils/currency_codes.csv` relative to the working directory)."""
    venv = Path(os.environ.get("GPULEDGER_FOCUS_VENV", ROOT / ".venv-focus"))
    entry = venv / "bin" / "focus-validator"
    packages = sorted(venv.glob("lib/python3*/site-packages/focus_validator"))
    if not entry.exists() or not packages:
        pytest.fail(
            f"the FinOps focus-validator is not installed in {venv}: create that venv with "
            f"`{FOCUS_VENV_HELP}` (or set GPULEDGER_FOCUS_VENV to one that has it)"
        )
    return entry, packages[0].parent


def export(url: str, out: Path, *extra: str) -> str:
    result = CliRunner().invoke(
        app, ["--store", url, "export", "focus", *TWO_WEEKS, "--out", str(out), *extra]
    )
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_focus_export_passes_the_finops_validator_with_zero_failed_checks(
    seeded_url: str, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"focus.{suffix}"
    export(seeded_url, out)
    entry, cwd = focus_validator()
    junit = tmp_path / "validator.xml"
    run = subprocess.run(
        [
            str(entry),
            "--data-file",
            str(out),
            "--validate-version",
            "1.0",
            "--output-type",
            "unittest",
            "--output-destination",
            str(junit),
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    suites = ET.parse(junit).getroot()
    failed = [
        case.get("name")
        for case in suites.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    summary = {k: suites.get(k) for k in ("tests", "failures", "errors", "skipped")}
    assert int(summary["tests"] or 0) >= 100, summary
    assert summary["failures"] == "0" and summary["errors"] == "0", (summary, failed)
    assert failed == []


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_focus_rows_bill_exactly_what_the_cost_facts_say(
    seeded_url: str, seeded: Client, tmp_path: Path
) -> None:
    out = tmp_path / "focus.csv"
    said = export(seeded_url, out)
    rows = read_csv(out)
    billed, hours = seeded.query(
        "SELECT sum(cost_usd * sign), sum(duration_s * share * sign) / 3600 "
        "FROM gpuledger.cost_facts WHERE ts >= '2026-11-02' AND ts < '2026-11-16'"
    ).result_rows[0]
    assert sum(float(r["BilledCost"]) for r in rows) == pytest.approx(billed)
    assert sum(float(r["ConsumedQuantity"]) for r in rows) == pytest.approx(hours)
    assert billed == pytest.approx(84.9714, abs=1e-4)
    assert "wrote 72 FOCUS rows" in said.replace("\n", " ")

    by_job: dict[str, float] = {}
    for r in rows:
        by_job[r["x_JobId"]] = by_job.get(r["x_JobId"], 0.0) + float(r["EffectiveCost"])
    # The hour first written unallocated and restated is billed once, to train-a1.
    assert by_job["train-a1"] == pytest.approx(20.0)
    assert by_job[""] == pytest.approx(8.0)  # H100-3 unallocated, and the unpriced hour at 0

    first = next(r for r in rows if r["x_JobId"] == "train-a1")
    assert json.loads(first["Tags"]) == {
        "team": "vision",
        "project": "detector",
        "job_type": "training",
        "experiment_id": "exp-1",
        "model": "yolo-v9",
        "environment": "research",
    }
    untagged = next(r for r in rows if r["x_JobId"] == "nb-m1")
    assert json.loads(untagged["Tags"])["environment"] == "dev"
    assert "model" not in json.loads(untagged["Tags"])  # an empty tag is left out
    assert first["ChargePeriodStart"] == "2026-11-02T00:00:00Z"
    assert first["ChargePeriodEnd"] == "2026-11-02T01:00:00Z"
    assert first["BillingPeriodStart"] == "2026-11-01T00:00:00Z"
    assert first["BillingPeriodEnd"] == "2026-12-01T00:00:00Z"
    assert (first["PricingCategory"], first["PricingUnit"], first["ResourceId"]) == (
        "Standard",
        "GPU-Hours",
        "H100-0",
    )
    assert float(first["x_GpuUtilization"]) == pytest.approx(0.2)
    assert float(first["x_IdleCost"]) == pytest.approx(3.2)

    spot = next(r for r in rows if r["x_JobId"] == "train-b1")
    assert (spot["PricingCategory"], float(spot["ListUnitPrice"])) == ("Dynamic", 0.8)
    mig = next(r for r in rows if r["x_JobId"] == "nb-m1")
    assert mig["ResourceType"] == "GPU MIG instance"
    assert float(mig["ContractedUnitPrice"]) == pytest.approx(2 / 7)
    assert mig["x_GpuUtilization"] == ""  # MIG instances report no utilization
    unpriced = next(r for r in rows if r["x_Node"] == "n4")
    assert (unpriced["x_PriceMissing"], unpriced["BilledCost"]) == ("true", "0.0")
    assert (unpriced["ProviderName"], unpriced["RegionId"]) == ("Unspecified", "")
    assert unpriced["SubAccountId"] == "unallocated"
    for alias, column in LEGACY_COLUMNS.items():
        assert all(r[alias] == r[column] for r in rows)


def test_parquet_export_types_times_as_utc_and_money_as_doubles(
    seeded_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "focus.parquet"
    export(seeded_url, out)
    table = pq.read_table(out)
    assert str(table.schema.field("ChargePeriodStart").type) == "timestamp[ms, tz=UTC]"
    assert str(table.schema.field("BilledCost").type) == "double"
    assert table.num_rows == 72
    assert sum(table.column("BilledCost").to_pylist()) == pytest.approx(84.9714, abs=1e-4)


def test_export_can_leave_out_the_validators_legacy_columns(
    seeded_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "strict.csv"
    export(seeded_url, out, "--no-legacy-columns")
    with out.open(encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert tuple(header) == COLUMNS
    assert all(c.startswith("x_") for c in header if c not in FOCUS_COLUMNS)


def test_export_says_how_to_name_a_file_it_cannot_tell_the_format_of(
    seeded_url: str, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app,
        ["--store", seeded_url, "export", "focus", *TWO_WEEKS, "--out", str(tmp_path / "f.txt")],
    )
    assert result.exit_code == 2
    said = " ".join(result.output.replace("│", " ").split())
    assert "f.txt': cannot tell the format from the name; end it in .csv or .parquet" in said


def test_reserved_gpu_time_is_a_committed_charge_clipped_to_the_window() -> None:
    hour = T0 + 30 * timedelta(hours=1)
    charge = HourlyCharge(
        hour=hour.replace(tzinfo=None),  # as clickhouse-connect returns UTC times
        gpu_uuid="H100-9",
        node="n9",
        gpu_model="H100",
        mig_profile="",
        job_id="train-r",
        team="vision",
        project="detector",
        job_type="training",
        experiment_id="",
        provider="acme",
        region="r1",
        pricing_model="reserved",
        gpu_seconds=1800.0,
        cost_usd=1.25,  # half an hour at the reserved $2.50
        idle_cost_usd=0.25,
        util_gpu_seconds=1800.0,
        util_sm_seconds=1440.0,
        price_missing_gpu_seconds=0.0,
    )
    window = Window(hour + timedelta(minutes=30), T0 + 2 * DAY)
    row = focus_row(
        charge, window, PriceIndex(TEST_PRICES), load_gpu_models(), BillingAccount("acct-1")
    )
    assert row["PricingCategory"] == "Committed"
    assert (row["CommitmentDiscountType"], row["CommitmentDiscountStatus"]) == ("Reserved", "Used")
    assert row["CommitmentDiscountCategory"] == "Usage"
    assert row["CommitmentDiscountId"] == "acme:H100:r1:reserved"
    # Billed at the reserved rate, listed at the on-demand rate of the same SKU.
    assert (row["BilledCost"], row["ContractedUnitPrice"]) == (1.25, 2.5)
    assert (row["ListUnitPrice"], row["ListCost"]) == (4.0, 2.0)
    assert row["ChargePeriodStart"] == datetime(2026, 11, 3, 6, 30, tzinfo=UTC)
    assert row["ChargePeriodEnd"] == datetime(2026, 11, 3, 7, 0, tzinfo=UTC)
    assert row["x_GpuUtilization"] == pytest.approx(0.8)
    assert row["BillingAccountId"] == "acct-1"
