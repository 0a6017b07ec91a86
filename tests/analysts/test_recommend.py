"""`gpuledger recommend`: right-sizing, spot, reserved and idle endpoints, each with dollars
that can be checked on paper."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from clickhouse_connect.driver.client import Client
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gpuledger.analysts.findings import Basis, EndpointHour, JobProfile, Kind, Thresholds
from gpuledger.analysts.oversized import memory_light, oversized, whole_node
from gpuledger.analysts.prices import load_gpu_specs
from gpuledger.analysts.recommend import (
    best_commitment,
    idle_endpoints,
    rightsize,
    spot,
)
from gpuledger.analysts.window import Window
from gpuledger.cli import app
from gpuledger.ledger.prices import PriceIndex
from gpuledger.schema.messages import PriceEntry, PricingModel
from gpuledger.schema.migrate import migrate
from gpuledger.schema.pricebook import load_gpu_models
from tests.analysts.seed import (
    DAY,
    GB,
    HOUR,
    T0,
    TEST_PRICES,
    Job,
    fact,
    insert_facts,
    insert_jobs,
)

PRICES = PriceIndex(TEST_PRICES)
SPECS = load_gpu_specs()
CATALOG = load_gpu_models()
TWO_DAYS = Window(T0, T0 + 2 * DAY)  # x 15 to a 30-day month


def basis(window: Window = TWO_DAYS, prices: PriceIndex = PRICES) -> Basis:
    return Basis(prices, SPECS, CATALOG, window)


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
    advice = rightsize(profile(), basis())
    assert advice is not None
    # Needs 0.2 x 989 x 1.25 = 247 TFLOPS and 9.6 GB: 1g.10gb (141 TFLOPS) is too small,
    # 2g.20gb (283 TFLOPS, 20 GB) fits at 2/7 of $4, cheaper than an A100-40GB at $2.
    assert advice.proposed == "1 x H100 MIG 2g.20gb at $1.143/GPU-h"
    assert advice.window_saving_usd == pytest.approx((4 - 8 / 7) * 5)
    assert advice.monthly_saving_usd == pytest.approx((4 - 8 / 7) * 5 * 15)
    assert advice.risk.startswith("low")


def test_a_multi_gpu_job_moves_to_a_smaller_model_never_to_mig_slices() -> None:
    advice = rightsize(profile(gpus=2, gpu_hours=10.0, cost_usd=40.0), basis())
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
    advice = rightsize(job, basis(prices=prices))
    assert advice is not None and advice.proposed == "2 x A100-40GB at $2/GPU-h"
    # A node without NodeInfo (provider `*`) is priced by the fallbacks: there they count.
    unknown = replace(job, provider="*", region="*")
    advice = rightsize(unknown, basis(prices=prices))
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
    assert rightsize(job, basis()) is None


def test_spot_for_a_checkpointing_job_is_low_risk_and_saves_the_spot_discount() -> None:
    advice = spot(profile(labels={"checkpoint": "true"}, state="failed"), basis())
    assert advice is not None and advice.kind is Kind.spot
    assert advice.window_saving_usd == pytest.approx((4 - 1.5) * 5)
    assert advice.risk.startswith("low: the job checkpoints")
    assert "2 minutes" in advice.risk


def test_spot_for_a_long_clean_run_without_checkpoints_states_the_restart_risk() -> None:
    advice = spot(profile(), basis())
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
    assert spot(profile(**changes), basis()) is None


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
    [advice] = idle_endpoints(hours, basis())
    assert advice.window_saving_usd == pytest.approx(1.5)  # 3 idle hours x $0.50
    assert advice.monthly_saving_usd == pytest.approx(22.5)
    assert advice.proposed.startswith("scale to zero after an hour without requests")
    assert idle_endpoints(hours[:2] + hours[4:], basis()) == []  # one idle hour only
    [unused] = idle_endpoints([_hour(0, 0), _hour(1, 0)], basis())
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


# -- instance-type guardrails: flags, with dollars ----------------------------------------------

EIGHT_DAYS = Window(T0, T0 + 8 * DAY)  # x 30/8 to a month


def served(**changes: object) -> JobProfile:
    """An H100 inference endpoint held 8 days (192 GPU-hours at $4), 8 GB peak: 10 %."""
    base: dict[str, object] = {
        "job_id": "infer-x",
        "job_type": "inference",
        "first_ts": T0,
        "last_ts": T0 + 8 * DAY,
        "gpu_hours": 192.0,
        "gpu_seconds": 192 * 3600.0,
        "cost_usd": 768.0,
    }
    return profile(**{**base, **changes})


def test_an_endpoint_using_a_tenth_of_its_h100_for_a_week_is_flagged_with_the_slice_that_fits() -> (
    None
):
    flag = memory_light(served(), basis(EIGHT_DAYS))
    assert flag is not None and flag.kind is Kind.oversized
    # 9.6 GB and 247 TFLOPS with headroom: the 2g.20gb slice at 2/7 of $4.
    assert flag.proposed == "1 x H100 MIG 2g.20gb (20 GB)"
    assert flag.window_saving_usd == pytest.approx((4 - 8 / 7) * 192)
    assert flag.monthly_saving_usd == pytest.approx((4 - 8 / 7) * 192 * 30 / 8)
    assert "10% of 80 GB" in flag.current


@pytest.mark.parametrize(
    "changes",
    [
        {"peak_mem_bytes": 17 * GB},  # 21 % of the memory
        {"last_ts": T0 + 6 * DAY},  # held under a week
        {"job_type": "training"},
        {"mig_profile": "3g.40gb"},  # a slice already
        {"cost_usd": 0.0},  # unpriced
    ],
)
def test_a_fitting_or_short_lived_workload_is_not_flagged(changes: dict[str, object]) -> None:
    flag = memory_light(served(**changes), basis(EIGHT_DAYS))
    assert flag is None


def test_a_notebook_holding_a_whole_node_is_flagged_with_all_but_one_gpu() -> None:
    notebook = profile(job_id="nb-8", job_type="notebook", gpus=8, cost_usd=64.0, gpu_hours=16.0)
    flag = whole_node(notebook, basis())
    assert flag is not None and flag.kind is Kind.oversized
    assert flag.window_saving_usd == pytest.approx(56.0)
    assert flag.monthly_saving_usd == pytest.approx(56.0 * 15)
    assert whole_node(replace(notebook, gpus=4), basis()) is None
    assert whole_node(replace(notebook, job_type="training"), basis()) is None


@settings(max_examples=300, deadline=None)
@given(
    peak_gb=st.floats(min_value=0.0, max_value=80.0),
    days=st.floats(min_value=0.0, max_value=14.0),
    gpus=st.integers(min_value=1, max_value=16),
    job_type=st.sampled_from(["inference", "notebook", "training"]),
)
def test_a_flag_is_said_only_past_its_thresholds_and_never_saves_more_than_was_spent(
    peak_gb: float, days: float, gpus: int, job_type: str
) -> None:
    job = served(
        peak_mem_bytes=int(peak_gb * GB),
        last_ts=T0 + timedelta(days=days),
        gpus=gpus,
        job_type=job_type,
    )
    thresholds = Thresholds()
    for flag in oversized([job], basis(EIGHT_DAYS)):
        assert 0 < flag.window_saving_usd <= job.cost_usd + 1e-9
        if "notebook" in flag.current:
            assert job_type == "notebook" and gpus >= thresholds.whole_node_gpus
        else:
            assert job_type == "inference" and days >= thresholds.oversized_min_days
            assert int(peak_gb * GB) < thresholds.oversized_memory_share * 80 * GB


def test_recommend_flags_a_notebook_holding_a_whole_node_from_the_store(
    store_url: str, ch: Client
) -> None:
    migrate(ch)
    notebook = Job("nb-node", "running", "research", "llm", "notebook", "",
                   [f"H100-{i}" for i in range(8)], T0, None)  # fmt: skip
    insert_jobs(ch, [notebook])
    insert_facts(
        ch,
        [
            fact(T0 + h * HOUR, f"H100-{i}", "H100", notebook, util=0.01, mem_gb=2)
            for i in range(8)
            for h in (0, 1)
        ],
    )
    result = CliRunner().invoke(
        app,
        ["--store", store_url, "recommend", "--from", "2026-11-02", "--to", "2026-11-04",
         "--format", "json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    flags = [r for r in json.loads(result.stdout) if r["kind"] == "oversized"]
    # By hand: 8 GPUs x 2 h x $4 = $64; one GPU would have cost $8: $56 in the window, x 15.
    assert [(f["subject"], f["window_saving_usd"]) for f in flags] == [
        ("nb-node", pytest.approx(56.0))
    ]
    assert flags[0]["monthly_saving_usd"] == pytest.approx(56.0 * 15)
