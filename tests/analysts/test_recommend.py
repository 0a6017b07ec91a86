"""`gpuledger recommend`: right-sizing, spot, reserved and idle endpoints, each with dollars
that can be checked on paper."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from clickhouse_connect.driver.client import Client
from typer.testing import CliRunner

from gpuledger.analysts.prices import load_gpu_specs
from gpuledger.analysts.recommend import (
    EndpointHour,
    JobProfile,
    Kind,
    best_commitment,
    idle_endpoints,
    rightsize,
    spot,
)
from gpuledger.analysts.window import Window
from gpuledger.cli import app
from gpuledger.ledger.prices import PriceIndex
from gpuledger.schema.messages import PriceEntry, PricingModel
from gpuledger.schema.pricebook import load_gpu_models
from tests.analysts.seed import DAY, GB, HOUR, T0, TEST_PRICES

PRICES = PriceIndex(TEST_PRICES)
SPECS = load_gpu_specs()
CATALOG = load_gpu_models()
TWO_DAYS = Window(T0, T0 + 2 * DAY)  # x 15 to a 30-day month


def profile(**changes: object) -> JobProfile:
    """A one-H100 on-demand training job on acme/r1: 5 GPU-hours at $4, 20 % busy, 8 GB."""
    base = JobProfile(
        job_id="train-x",
        team="vision",
        project="detector",
        job_type="training",
        experiment_id="",
        state="succeeded",
        started_at=T0,
        ended_at=T0 + 5 * HOUR,
        labels={},
        gpu_model="H100",
        mig_profile="",
        provider="acme",
        region="r1",
        pricing_model="on_demand",
        gpus=1,
        first_ts=T0,
        last_ts=T0 + 4 * HOUR,
        gpu_seconds=5 * 3600.0,
        gpu_hours=5.0,
        cost_usd=20.0,
        idle_cost_usd=16.0,
        peak_mem_bytes=8 * GB,
        p95_util_sm=0.2,
        max_util_sm=0.2,
        mean_util_sm=0.2,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_lightly_used_gpu_is_cut_to_the_cheapest_mig_slice_that_fits() -> None:
    advice = rightsize(profile(), prices=PRICES, specs=SPECS, catalog=CATALOG, window=TWO_DAYS)
    assert advice is not None
    # Needs 0.2 x 989 x 1.25 = 247 TFLOPS and 9.6 GB: 1g.10gb (141 TFLOPS) is too small,
    # 2g.20gb (283 TFLOPS, 20 GB) fits at 2/7 of $4, cheaper than an A100-40GB at $2.
    assert advice.proposed == "1 x H100 MIG 2g.20gb at $1.143/GPU-h"
    assert advice.window_saving_usd == pytest.approx((4 - 8 / 7) * 5)
    assert advice.monthly_saving_usd == pytest.approx((4 - 8 / 7) * 5 * 15)
    assert advice.risk.startswith("low")


def test_a_multi_gpu_job_moves_to_a_smaller_model_never_to_mig_slices() -> None:
    advice = rightsize(
        profile(gpus=2, gpu_hours=10.0, cost_usd=40.0),
        prices=PRICES,
        specs=SPECS,
        catalog=CATALOG,
        window=TWO_DAYS,
    )
    assert advice is not None
    assert advice.proposed == "2 x A100-40GB at $2/GPU-h"  # 312 TFLOPS, 40 GB, $2
    assert advice.window_saving_usd == pytest.approx((4 - 2) * 10)
    assert advice.risk.startswith("medium")


def test_a_cheaper_gpu_is_proposed_only_where_the_jobs_provider_sells_it() -> None:
    # A fallback price for any provider (`*`/`*`) of an L40S, cheaper than acme's A100.
    anywhere = PriceEntry(
        provider="*",
        region="*",
        gpu_model="L40S",
        pricing_model=PricingModel.on_demand,
        usd_per_gpu_hour=0.9,
    )
    prices = PriceIndex([*TEST_PRICES, anywhere])
    job = profile(gpus=2, gpu_hours=10.0, cost_usd=40.0)
    advice = rightsize(job, prices=prices, specs=SPECS, catalog=CATALOG, window=TWO_DAYS)
    assert advice is not None and advice.proposed == "2 x A100-40GB at $2/GPU-h"
    # A node without NodeInfo (provider `*`) is priced by the fallbacks: there they count.
    unknown = replace(job, provider="*", region="*")
    advice = rightsize(unknown, prices=prices, specs=SPECS, catalog=CATALOG, window=TWO_DAYS)
    assert advice is not None and advice.proposed == "2 x L40S at $0.9/GPU-h"


@pytest.mark.parametrize(
    "changes",
    [
        {"p95_util_sm": 0.9},  # busy: nothing smaller has the compute
        {"peak_mem_bytes": 70 * GB},  # 84 GB with headroom: nothing smaller has the memory
        {"p95_util_sm": None, "mig_profile": "1g.10gb"},  # a MIG instance already
        {"gpu_hours": 0.5, "cost_usd": 2.0},  # too little GPU time to judge
        {"gpu_model": "HL-225"},  # no specs for the model
    ],
)
def test_rightsizing_leaves_jobs_it_cannot_improve_alone(changes: dict[str, object]) -> None:
    job = profile(**changes)
    assert rightsize(job, prices=PRICES, specs=SPECS, catalog=CATALOG, window=TWO_DAYS) is None


def test_spot_for_a_checkpointing_job_is_low_risk_and_saves_the_spot_discount() -> None:
    advice = spot(
        profile(labels={"checkpoint": "true"}, state="failed"),
        prices=PRICES,
        catalog=CATALOG,
        window=TWO_DAYS,
    )
    assert advice is not None and advice.kind is Kind.spot
    assert advice.window_saving_usd == pytest.approx((4 - 1.5) * 5)
    assert advice.risk.startswith("low: the job checkpoints")
    assert "2 minutes" in advice.risk


def test_spot_for_a_long_clean_run_without_checkpoints_states_the_restart_risk() -> None:
    advice = spot(profile(), prices=PRICES, catalog=CATALOG, window=TWO_DAYS)
    assert advice is not None
    assert advice.risk.startswith("medium: it ran 5.0 h and succeeded, but has no checkpoint")


@pytest.mark.parametrize(
    "changes",
    [
        {"state": "failed"},  # no checkpoint and no clean run
        {"ended_at": T0 + timedelta(minutes=40)},  # too short to call it long
        {"pricing_model": "spot"},  # on spot already
        {"job_type": "inference"},  # serving is not batch work
        {"gpu_model": "T4", "cost_usd": 1.25, "labels": {"checkpoint": "1"}},  # no T4 spot price
    ],
)
def test_spot_is_not_proposed_where_it_does_not_fit(changes: dict[str, object]) -> None:
    assert spot(profile(**changes), prices=PRICES, catalog=CATALOG, window=TWO_DAYS) is None


def test_reserving_pays_for_the_gpus_busy_more_often_than_the_price_ratio() -> None:
    # Ten hours; reserved at half the on-demand rate pays for a GPU busy > 50 % of hours.
    demand = [2, 2, 2, 1, 0, 0, 0, 0, 1, 1]
    # B = 1: 6 busy hours x $1 - 10 x $0.5 = $1; B = 2: 9 x $1 - 20 x $0.5 = -$1.
    assert best_commitment(demand, 1.0, 0.5) == (1, pytest.approx(1.0))
    assert best_commitment(demand, 1.0, 1.0) == (0, 0.0)
    assert best_commitment([0.0] * 10, 1.0, 0.1) == (0, 0.0)


def _hour(h: int, requests: int, cost: float = 0.5) -> EndpointHour:
    return EndpointHour("ep", T0 + h * HOUR, "nlp", "chat", cost, 3600.0, 0.0, requests, 0)


def test_an_endpoint_that_paid_for_hours_without_requests_should_scale_to_zero() -> None:
    hours = [_hour(0, 100), _hour(1, 0), _hour(2, 0), _hour(3, 0), _hour(4, 50)]
    [advice] = idle_endpoints(hours, window=TWO_DAYS)
    assert advice.window_saving_usd == pytest.approx(1.5)  # 3 idle hours x $0.50
    assert advice.monthly_saving_usd == pytest.approx(22.5)
    assert advice.proposed.startswith("scale to zero after an hour without requests")
    assert idle_endpoints(hours[:2] + hours[4:], window=TWO_DAYS) == []  # one idle hour only
    [unused] = idle_endpoints([_hour(0, 0), _hour(1, 0)], window=TWO_DAYS)
    assert unused.proposed.startswith("no request in the whole window")


# Hand-computed for the seeded fleet over Nov 2-3 (two days, so x 15 per 30 days):
SEEDED_ADVICE = [
    # infer-e1: 30 hours without a request at $0.50.
    ("scale_to_zero", "infer-e1", 15.0, 225.0),
    # train-a1: 5 GPU-hours from $4 to 2/7 of $4.
    ("rightsize", "train-a1", (4 - 8 / 7) * 5, (4 - 8 / 7) * 5 * 15),
    # train-a1 and train-a2: 5 and 4 GPU-hours from $4 to $1.50.
    ("spot", "train-a1", 12.5, 187.5),
    ("spot", "train-a2", 10.0, 150.0),
    # One L4 busy all 48 hours: 48 x $0.50 - 48 x $0.30.
    ("reserved", "acme/r1/L4", 9.6, 144.0),
    # infer-e2: 4 GPU-hours from an L4 at $0.50 to a T4 at $0.25.
    ("rightsize", "infer-e2", 1.0, 15.0),
]


def test_recommend_command_lists_the_seeded_fleets_savings_and_saves_them(
    seeded_url: str, seeded: Client
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "--store",
            seeded_url,
            "recommend",
            "--from",
            "2026-11-02",
            "--to",
            "2026-11-04",
            "--format",
            "json",
            "--save",
        ],
    )
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    got = [
        (r["kind"], r["subject"], r["window_saving_usd"], r["monthly_saving_usd"]) for r in listed
    ]
    assert [g[:2] for g in got] == [s[:2] for s in SEEDED_ADVICE]
    for (_, _, window_usd, month_usd), (_, _, want_window, want_month) in zip(
        got, SEEDED_ADVICE, strict=True
    ):
        assert (window_usd, month_usd) == (
            pytest.approx(want_window, abs=1e-4),
            pytest.approx(want_month, abs=1e-3),
        )
    assert "6 recommendations for 2026-11-02 to 2026-11-04" in result.stderr
    saved = seeded.query(
        "SELECT kind, subject, monthly_saving_usd FROM gpuledger.recommendations_latest"
    ).result_rows
    assert [(k, s) for k, s, _ in saved] == [s[:2] for s in SEEDED_ADVICE]


def test_a_saved_run_that_found_nothing_replaces_the_previous_advice(
    seeded_url: str, seeded: Client
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "--store",
            seeded_url,
            "recommend",
            "--from",
            "2027-01-01",
            "--to",
            "2027-01-08",
            "--save",
        ],
    )
    assert result.exit_code == 0, result.output
    latest = seeded.query(
        "SELECT kind, window_start FROM gpuledger.recommendations_latest"
    ).result_rows
    assert latest == [("none", datetime(2027, 1, 1))]
