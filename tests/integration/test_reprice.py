"""Repricing in the store: a backdated price, a late node description and a price for a model
that had none, applied to stored facts by `Corrections` on the real engine, leave exactly the
facts that costing every sample afresh with the final metadata makes (money to 1e-12
relative, every other column exact). The store reprices what it can in one statement per
chunk; the samples it cannot (no price before, a change at their millisecond) are re-costed.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any, cast

import pytest
from clickhouse_connect.driver.client import Client

from bench.reprice import corrections_of
from gpuledger.ledger import cost
from gpuledger.ledger.factrows import VALUE_COLUMNS, Row, fact_row, stored_row
from gpuledger.ledger.facts import FactBatch
from gpuledger.ledger.restate import Scope, live_rows, same_rows
from gpuledger.ledger.state import MetadataState
from gpuledger.schema.messages import (
    GpuSample,
    IdleBasis,
    JobEvent,
    JobState,
    JobType,
    NodeInfo,
    PriceEntry,
    PricingModel,
    ProcessLabels,
    ProcessSample,
)
from gpuledger.schema.migrate import migrate
from gpuledger.schema.pricebook import GpuModelCatalog, GpuModelPattern, load_gpu_models
from gpuledger.streams.sink import FactSink

pytestmark = pytest.mark.integration

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SECONDS = 240
CATALOG = load_gpu_models()
COST = VALUE_COLUMNS.index("cost_usd")
SPOT = "n'spot\\ \t\u00e9\x00"  # a node name is any string: quotes, escapes, NUL reach the SQL

# (gpu, node, product, MIG profile)
GPUS = [
    ("GPU-h1", "n-od", "NVIDIA H100 80GB HBM3", None),
    ("GPU-h2", "n-od", "NVIDIA H100 80GB HBM3", None),  # shared by two labelled jobs
    ("GPU-s1", SPOT, "NVIDIA H100 80GB HBM3", None),
    ("GPU-m1", "n-mig", "NVIDIA A100-SXM4-80GB", "3g.40gb"),
    ("GPU-m2", "n-mig", "NVIDIA A100-SXM4-80GB", None),  # shared by two labelled jobs
    ("GPU-x1", "n-odd", "Mystery GPU", None),
]
BEFORE: list[Any] = [
    PriceEntry(
        provider="*",
        region="*",
        gpu_model="H100",
        pricing_model=PricingModel.on_demand,
        usd_per_gpu_hour=4.0,
    ),
    PriceEntry(
        provider="aws",
        region="us-east-1",
        gpu_model="H100",
        pricing_model=PricingModel.spot,
        usd_per_gpu_hour=2.0,
    ),
    NodeInfo(ts=T0, node=SPOT, provider="aws", region="us-east-1", pricing_model=PricingModel.spot),
    NodeInfo(ts=T0, node="n-odd", usd_per_gpu_hour=1.5),
    JobEvent(
        ts=T0,
        job_id="train",
        state=JobState.running,
        team="vision",
        gpu_uuids=["GPU-h1"],
        started_at=T0,
    ),
]
LATE: list[Any] = [
    # A backdated price, effective at a millisecond some samples straddle.
    PriceEntry(
        provider="*",
        region="*",
        gpu_model="H100",
        pricing_model=PricingModel.on_demand,
        usd_per_gpu_hour=6.0,
        effective_from=T0 + 100.0,
    ),
    # A price for a model that had none: its facts were stored at $0.
    PriceEntry(
        provider="*",
        region="*",
        gpu_model="A100-80GB",
        pricing_model=PricingModel.on_demand,
        usd_per_gpu_hour=3.0,
        effective_from=T0 - 3600.0,
    ),
    # The spot node's own negotiated price, from a time in its facts on.
    NodeInfo(
        ts=T0 + 150.0,
        node=SPOT,
        provider="aws",
        region="us-east-1",
        pricing_model=PricingModel.spot,
        usd_per_gpu_hour=1.25,
    ),
]


def samples() -> list[GpuSample]:
    rng = random.Random(7)
    out = []
    for k in range(SECONDS):
        for gpu, node, product, mig in GPUS:
            # Some samples a fraction of a millisecond off the second, as a real clock stamps
            # them; intervals NVML-measured, not exactly representable in Float32.
            ts = T0 + k + (0.0004 if k % 7 == 0 else 0.0)
            labelled = gpu in ("GPU-h2", "GPU-m2")
            out.append(
                GpuSample(
                    ts=ts,
                    node=node,
                    gpu_uuid=gpu,
                    gpu_name=product,
                    mig_profile=mig,
                    interval_s=1.000213 if k % 3 else 1.0,
                    util_sm=rng.choice([None, 0.0, 0.02, 0.37, 1.0]),
                    sm_active=rng.choice([None, 0.01, 0.6]),
                    mem_used_bytes=rng.randrange(0, 80 << 30),
                    power_w=rng.uniform(60, 700),
                    processes=[
                        ProcessSample(
                            pid=1, util_sm=0.25, labels=ProcessLabels(job_id="a", team="nlp")
                        ),
                        ProcessSample(
                            pid=2, util_sm=0.5, labels=ProcessLabels(job_id="b", team="nlp")
                        ),
                    ]
                    if labelled
                    else [],
                )
            )
    return out


def applied(state: MetadataState, messages: list[Any]) -> list[Scope]:
    """The scopes of the facts these messages may alter, applied to `state` in order."""
    scopes: list[Scope] = []
    for message in messages:
        if isinstance(message, PriceEntry):
            scopes += state.apply_price(message)
        elif isinstance(message, NodeInfo):
            scopes += state.apply_node(message)
        else:
            scopes += state.apply_job(message)
    return scopes


def state_of(
    messages: list[Any], catalog: GpuModelCatalog = CATALOG, basis: IdleBasis = IdleBasis.busy_time
) -> tuple[MetadataState, list[Scope]]:
    state = MetadataState(catalog, idle_basis=basis)
    return state, applied(state, messages)


class CountingSink(FactSink):
    """The real sink, counting the rows the store wrote repricing by itself: by the ratio of
    the rates, and from raw samples."""

    repriced = 0
    from_samples = 0

    def _written(self, statement: Any, *args: Any) -> int:
        count = "SELECT count() FROM gpuledger.cost_facts"
        before = self.client.query(count).result_rows[0][0]
        statement(*args)
        return int(self.client.query(count).result_rows[0][0] - before)

    retagged = 0

    def reprice(self, *args: Any) -> None:
        written = self._written(super().reprice, *args)
        if len(args) > 5:  # an idle basis: from raw samples
            self.from_samples += written
        else:
            self.repriced += written

    def retag(self, *args: Any) -> None:
        self.retagged += self._written(super().retag, *args)


def stored_live(ch: Client) -> list[Row]:
    cols = ", ".join("toUnixTimestamp64Milli(ts)" if c == "ts" else c for c in VALUE_COLUMNS)
    result = ch.query(f"SELECT sign, {cols} FROM gpuledger.cost_facts")
    return list(live_rows(stored_row(r) for r in result.result_rows).elements())


def fresh(
    costed: list[GpuSample],
    messages: list[Any],
    catalog: GpuModelCatalog = CATALOG,
    basis: IdleBasis = IdleBasis.busy_time,
) -> list[Row]:
    cost._row_templates.clear()
    state, _ = state_of(messages, catalog, basis)
    return [fact_row(f) for f in state.cost_all(costed)]


@pytest.mark.parametrize("basis", list(IdleBasis))
def test_late_prices_and_nodes_are_restated_in_the_store_to_what_costing_afresh_gives(
    ch: Client, basis: IdleBasis
) -> None:
    migrate(ch)
    sink = CountingSink(ch)
    state, _ = state_of(BEFORE, basis=basis)
    raw = samples()
    sink.insert_facts(FactBatch.of(state.cost_all(raw)))
    sink.insert_raw(raw)
    assert not same_rows(
        stored_live(ch), fresh(raw, BEFORE + LATE, basis=basis)
    )  # something to correct

    corrections, stats = corrections_of(sink, state, [gpu for gpu, *_ in GPUS])
    scopes = applied(state, LATE)
    assert scopes and all(s.price_only for s in scopes)

    asyncio.run(corrections.apply(scopes, {0}))

    want = fresh(raw, BEFORE + LATE, basis=basis)
    got = stored_live(ch)
    assert same_rows(got, want)
    # The store repriced the H100 and spot facts by the rates' ratio, and the MIG A100's,
    # priced at $0 before, from its raw samples; the worker re-costed the shared A100's
    # (a $0 sample of two rows says nothing of their shares) and the samples at the
    # change's millisecond.
    assert sink.repriced > 1000
    assert sink.from_samples == 2 * SECONDS
    # ... to the last bit: the cost model's own arithmetic on the sample's own values.
    gpu_at = VALUE_COLUMNS.index("gpu_uuid")
    mig = sorted(r for r in got if r[gpu_at] == "GPU-m1")
    assert mig == sorted(r for r in want if r[gpu_at] == "GPU-m1")
    recosted = stats.corrected_rows - sink.repriced - sink.from_samples
    assert 2 * 2 * SECONDS <= recosted < 2 * 2 * SECONDS + 200

    # Done again (a worker taking the partition over redoes it): nothing more is written.
    rows = ch.query("SELECT count() FROM gpuledger.cost_facts").result_rows[0][0]
    asyncio.run(corrections.apply(scopes, {0}))
    assert ch.query("SELECT count() FROM gpuledger.cost_facts").result_rows[0][0] == rows

    # Money in the views agrees: the rollups were fed by the same statements.
    total = ch.query("SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts").result_rows[0][0]
    rolled = ch.query("SELECT sum(cost_usd) FROM gpuledger.cost_hour").result_rows[0][0]
    assert total == pytest.approx(sum(cast(float, r[COST]) for r in want), rel=1e-12)
    assert rolled == pytest.approx(total, rel=1e-12)

    # A later change over facts corrected before (their cancel rows are there): each row is
    # live as many times as its +1 copies outnumber its -1 copies.
    again = PriceEntry(
        provider="*",
        region="*",
        gpu_model="H100",
        pricing_model=PricingModel.on_demand,
        usd_per_gpu_hour=4.0,
        effective_from=T0 + 100.0,
    )
    repriced = sink.repriced
    asyncio.run(corrections.apply(state.apply_price(again), {0}))
    assert sink.repriced > repriced
    assert same_rows(stored_live(ch), fresh(raw, [*BEFORE, *LATE, again], basis=basis))


def test_a_model_name_no_pattern_matches_is_repriced_from_its_samples(ch: Client) -> None:
    """With a catalog whose patterns miss a model's own name, a fact stored as "H100" may be
    the model's (priced by the book) or an unmatched product's of that name (priced by its
    node alone): the store leaves both to their samples, which tell them apart."""
    migrate(ch)
    hopper = GpuModelCatalog([GpuModelPattern(re.compile("Hopper"), "H100", 7)])
    sink = CountingSink(ch)
    before: list[Any] = [
        PriceEntry(
            provider="*",
            region="*",
            gpu_model="H100",
            pricing_model=PricingModel.on_demand,
            usd_per_gpu_hour=4.0,
        )
    ]
    state, _ = state_of(before, hopper)
    raw = [
        GpuSample(ts=T0 + k, node="n1", gpu_uuid=gpu, gpu_name=name, util_sm=0.5)
        for k in range(30)
        for gpu, name in (("GPU-model", "Hopper 80GB"), ("GPU-product", "H100"))
    ]
    sink.insert_facts(FactBatch.of(state.cost_all(raw)))
    sink.insert_raw(raw)
    corrections, stats = corrections_of(sink, state, ["GPU-model", "GPU-product"])
    later = PriceEntry(
        provider="*",
        region="*",
        gpu_model="H100",
        pricing_model=PricingModel.on_demand,
        usd_per_gpu_hour=8.0,
        effective_from=T0 + 10.0,
    )
    asyncio.run(corrections.apply(state.apply_price(later), {0}))
    assert same_rows(stored_live(ch), fresh(raw, [*before, later], hopper))
    assert sink.repriced == 0  # the store repriced nothing itself
    assert stats.corrected_rows == 40  # the model's last 20 s: cancelled and restated


def test_a_jobs_new_tags_are_restated_in_the_store_to_what_costing_afresh_gives(
    ch: Client,
) -> None:
    migrate(ch)
    sink = CountingSink(ch)
    state, _ = state_of(BEFORE)
    raw = samples()
    sink.insert_facts(FactBatch.of(state.cost_all(raw)))
    sink.insert_raw(raw)
    corrections, stats = corrections_of(sink, state, [gpu for gpu, *_ in GPUS])
    late = [
        # The explicit holder of GPU-h1 is retagged ...
        JobEvent(
            ts=T0 + 500, job_id="train", team="research", project="llm", job_type=JobType.training
        ),
        # ... a job known only from its processes' labels gains a record (a tag value is
        # any string: quotes, escapes, NUL reach the SQL as bound values) ...
        JobEvent(ts=T0 + 500, job_id="a", project="p'x\\ \x00", environment="prod"),
        # ... and one's record overrides the team its processes' labels gave it.
        JobEvent(ts=T0 + 501, job_id="b", team="vision"),
        # Labels are in no fact: nothing to restate.
        JobEvent(ts=T0 + 502, job_id="b", labels={"queue": "gpu"}),
    ]
    scopes = applied(state, late)
    assert len(scopes) == 3 and all(s.retag for s in scopes)

    asyncio.run(corrections.apply(scopes, {0}))

    want = fresh(raw, BEFORE + late)
    assert same_rows(stored_live(ch), want)
    # All in the store: a cancel and a restated row for each row of the three jobs.
    job_at = VALUE_COLUMNS.index("job_id")
    assert sink.retagged == 2 * sum(1 for r in want if r[job_at] in ("train", "a", "b"))
    assert stats.corrected_rows == sink.retagged

    # Done again: nothing more is written.
    rows = ch.query("SELECT count() FROM gpuledger.cost_facts").result_rows[0][0]
    asyncio.run(corrections.apply(scopes, {0}))
    assert ch.query("SELECT count() FROM gpuledger.cost_facts").result_rows[0][0] == rows

    # Over rows cancelled before, a retag back; the rollups follow.
    back = JobEvent(ts=T0 + 600, job_id="train", team="vision")
    asyncio.run(corrections.apply(state.apply_job(back), {0}))
    want = fresh(raw, [*BEFORE, *late, back])
    assert same_rows(stored_live(ch), want)
    team_at, cost_at = VALUE_COLUMNS.index("team"), VALUE_COLUMNS.index("cost_usd")
    by_team = {
        team: usd
        for team, usd in ch.query(
            "SELECT team, sum(cost_usd) FROM gpuledger.cost_hour GROUP BY team HAVING count()"
        ).result_rows
    }
    for team in {r[team_at] for r in want}:
        spent = sum(cast(float, r[cost_at]) for r in want if r[team_at] == team)
        assert by_team.get(team, 0.0) == pytest.approx(spent, rel=1e-12, abs=1e-12)

    # In one batch, a retag and then a change of what the job holds (re-costed in Python,
    # after the store's retag, with the state as it is now).
    batch = [
        JobEvent(ts=T0 + 700, job_id="b", team="search"),
        JobEvent(ts=T0 + 701, job_id="b", gpu_uuids=["GPU-m2"], started_at=T0 + 60),
    ]
    scopes = applied(state, batch)
    assert scopes[0].retag and not any(s.retag for s in scopes[1:])
    asyncio.run(corrections.apply(scopes, {0}))
    assert same_rows(stored_live(ch), fresh(raw, [*BEFORE, *late, back, *batch]))
