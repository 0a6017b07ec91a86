"""Repricing: stored facts restated per second when a backdated price reaches the worker,
against the goal (>= 1,000,000 facts a second, each fact's cancel and restated rows both
written).

The store holds the bench fleet's facts, made by the worker's own code (`bench/_facts.py`)
and copied forward in time in SQL; the first seconds' raw samples are kept as the worker
keeps them. A new price entry for the series that prices most of the fleet, effective just
before the first fact, then goes through the worker's own `Corrections.apply` on the real
store: the store reprices the facts in `INSERT … SELECT` statements (ledger/reprice.py).

Baseline, same run and store: the same price over the first seconds only, corrected the
way a job change is (and every correction was before), re-costing each raw sample in Python
and writing the rows it changed. Both are checked: the live dollars of the scope after it
are the dollars before times the price ratio (to 1e-9), and no live row was added or lost.
Beside them, the store copying as many rows into cost_facts (its rollups fed, nothing
computed): what any statement writing those rows could do on this machine.

Then the busiest team is renamed: a job event per job of it, each a change of tags alone,
restated in the store (`Scope.retag`, the jobs together); baseline, one job's first seconds
re-costed in Python. Checked: the team's live rows and dollars all carry the new name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import replace

from bench._facts import fill, replicate
from bench._fleet import Fleet
from bench._report import Figure, show
from bench._rig import Rig, Store
from gpuledger.ledger.joiner import Joiner
from gpuledger.ledger.restate import Scope
from gpuledger.ledger.state import MetadataState
from gpuledger.schema.messages import JobEvent, PriceEntry
from gpuledger.schema.topics import Topics
from gpuledger.streams import sql
from gpuledger.streams.corrections import Corrections
from gpuledger.streams.deadletters import DeadLetters
from gpuledger.streams.metadata import MetadataFeed
from gpuledger.streams.parts import WorkerParts
from gpuledger.streams.retries import StoreCalls
from gpuledger.streams.sink import FactSink
from gpuledger.streams.stats import WorkerStats

SUMMARY = "facts restated per second by a backdated price and a renamed team (INSERT … SELECT)"
GOAL_FACTS_PER_S = 1_000_000
RATIO = 0.85  # the new price, as a share of the old


def corrections_of(
    sink: FactSink, state: MetadataState, gpus: Iterable[str]
) -> tuple[Corrections, WorkerStats]:
    """The worker's corrections over this sink, its GPUs in samples partition 0."""
    stats = WorkerStats()
    parts = WorkerParts(
        topics=Topics(),
        state=state,
        joiner=Joiner(),
        sink=lambda: sink,
        calls=StoreCalls(asyncio.Event(), lambda: "corrections"),
        letters=DeadLetters(stats, "samples", "deadletters"),
        stats=stats,
        observers=[],
    )
    corrections = Corrections(parts, MetadataFeed(parts))
    for gpu in gpus:
        corrections.note_partition(gpu, 0)
    return corrections, stats


def busiest_entry(store: Store, state: MetadataState, first_ms: int) -> PriceEntry:
    """The price entry that prices the most facts."""
    found = store.client.query(
        """SELECT provider, region, gpu_model, pricing_model FROM gpuledger.cost_facts
           WHERE usd_per_gpu_hour > 0
           GROUP BY provider, region, gpu_model, pricing_model ORDER BY count() DESC LIMIT 5"""
    ).result_rows
    for provider, region, model, pricing in found:
        entry = state.prices.lookup(provider, region, model, pricing, first_ms / 1000)
        if entry is not None:
            return entry
    raise RuntimeError("no stored fact is priced by the price book")


def live(store: Store, scope: Scope, rate: float) -> tuple[float, int]:
    """(live dollars of a scope's facts at this rate, live rows of the scope)."""
    where, params = sql.scope_filter(scope)
    dollars, rows = store.client.query(
        f"""SELECT sumIf(cost_usd * sign, usd_per_gpu_hour = {{rate:Float64}}), sum(sign)
            FROM gpuledger.cost_facts WHERE {where}""",
        parameters={**params, "rate": rate},
    ).result_rows[0]
    return float(dollars), int(rows)


def timed_apply(corrections: Corrections, stats: WorkerStats, *scopes: Scope) -> tuple[float, int]:
    """(wall seconds, rows written) of one correction of these scopes."""
    before = stats.corrected_rows
    started = time.perf_counter()
    asyncio.run(corrections.apply(list(scopes), {0}))
    return time.perf_counter() - started, stats.corrected_rows - before


def team_live(store: Store, team: str) -> tuple[float, int]:
    """(live dollars, live rows) of a team's facts."""
    dollars, rows = store.client.query(
        "SELECT sum(cost_usd * sign), sum(sign) FROM gpuledger.cost_facts WHERE team = {t:String}",
        parameters={"t": team},
    ).result_rows[0]
    return float(dollars), int(rows)


def rename_team(
    store: Store, state: MetadataState, corrections: Corrections, stats: WorkerStats, early_ms: int
) -> tuple[Figure, str]:
    """The busiest team renamed: a job event with the new name for each of its jobs, each
    restated in the store (`Scope.retag`). Baseline: one job's first seconds re-costed in
    Python. Checked: the team's live rows and dollars all move to the new name."""
    client = store.client
    team = client.query(
        "SELECT team FROM gpuledger.cost_facts WHERE team != '' "
        "GROUP BY team ORDER BY count() DESC LIMIT 1"
    ).result_rows[0][0]
    jobs = client.query(
        "SELECT DISTINCT job_id FROM gpuledger.cost_facts WHERE team = {t:String} ORDER BY 1",
        parameters={"t": team},
    ).result_rows
    renamed = f"{team}-renamed"
    last_s = store.count("SELECT toUnixTimestamp64Milli(max(ts)) FROM gpuledger.cost_facts") / 1000
    scopes = [
        scope
        for (job_id,) in jobs
        for scope in state.apply_job(JobEvent(ts=last_s + 60, job_id=job_id, team=renamed))
    ]
    if not scopes or not all(s.retag for s in scopes):
        raise AssertionError(f"renaming team {team!r} is not a retag: {scopes[:3]}")
    before = team_live(store, team)
    early = replace(scopes[0], retag=(), t_to=early_ms / 1000)
    base_s, base_written = timed_apply(corrections, stats, early)
    set_s, set_written = timed_apply(corrections, stats, *scopes)
    after, left = team_live(store, renamed), team_live(store, team)
    if after[1] != before[1] or left[1] != 0 or abs(after[0] - before[0]) > 1e-9 * before[0]:
        raise AssertionError(f"team {team!r}: {before} before; {after} renamed, {left} left")
    facts, base_facts = set_written // 2, base_written // 2
    rate, base_rate = facts / set_s, base_facts / base_s
    figure = Figure(
        "facts restated per second (a team renamed: its jobs' tags, in the store)",
        f"{rate:,.0f}",
        f">= {GOAL_FACTS_PER_S:,}",
        rate >= GOAL_FACTS_PER_S,
        f"{base_rate:,.0f} re-costing each sample in Python",
        f"{rate / base_rate:,.0f}x",
        f"{facts:,} facts of {len(jobs):,} jobs in {set_s:.2f} s",
    )
    note = (
        f"team rename baseline: {base_facts:,} facts in {base_s:.2f} s; checked: the team's "
        f"{before[1]:,} live rows and ${before[0]:,.2f} all carry the new name"
    )
    return figure, note


def plain_copy(store: Store, rows: int) -> float:
    """Seconds the store takes to copy `rows` fact rows into cost_facts, feeding its
    rollups (in parallel, as corrections do), with nothing computed: the most any statement
    writing them could do here. (It adds copies to the facts: it runs after the checks.)"""
    started = time.perf_counter()
    store.client.command(
        f"INSERT INTO gpuledger.cost_facts SELECT * FROM gpuledger.cost_facts LIMIT {rows}",
        settings={"insert_deduplicate": 0, "parallel_view_processing": 1},
    )
    return time.perf_counter() - started


def run(quick: bool = False) -> None:
    nodes, ticks, raw_ticks, copies = (125, 20, 5, 4) if quick else (1250, 20, 4, 15)
    with Rig() as rig:
        store = rig.new_store()
        filled = fill(store, Fleet(nodes), ticks, raw_ticks=raw_ticks)
        assert filled.state is not None
        rows = replicate(store, copies, ticks * Fleet(nodes).interval_s)
        first_ms = store.count("SELECT toUnixTimestamp64Milli(min(ts)) FROM gpuledger.cost_facts")
        state = filled.state
        old = busiest_entry(store, state, first_ms)
        new = old.model_copy(
            update={
                "usd_per_gpu_hour": old.usd_per_gpu_hour * RATIO,
                "effective_from": (first_ms - 1000) / 1000,
            }
        )
        (scope,) = state.apply_price(new)
        gpus = store.client.query("SELECT DISTINCT gpu_uuid FROM gpuledger.cost_facts")
        corrections, stats = corrections_of(
            FactSink(store.client), state, [gpu for (gpu,) in gpus.result_rows]
        )
        corrections.own({0})
        print(
            f"{rows:,} facts of {filled.gpus:,} GPUs over {ticks * copies} s; repricing "
            f"{old.gpu_model} {old.pricing_model.value} ({old.provider}/{old.region}) "
            f"${old.usd_per_gpu_hour}/h -> ${new.usd_per_gpu_hour:.4f}/h",
            flush=True,
        )
        # Baseline: the first raw_ticks seconds re-costed sample by sample.
        early = replace(scope, price_only=False, t_to=(first_ms + raw_ticks * 1000) / 1000)
        old_rate, new_rate = old.usd_per_gpu_hour, new.usd_per_gpu_hour
        checks = []
        early_usd, early_rows = live(store, early, old_rate)
        base_s, base_written = timed_apply(corrections, stats, early)
        checks.append(("baseline", early_usd, early_rows, *live(store, early, new_rate)))
        # The store reprices the rest (what the baseline corrected is right already).
        rest = replace(scope, t_from=early.t_to)
        rest_usd, rest_rows = live(store, rest, old_rate)
        set_s, set_written = timed_apply(corrections, stats, scope)
        checks.append(("repricing", rest_usd, rest_rows, *live(store, rest, new_rate)))
        early_ms = first_ms + raw_ticks * 1000
        team_figure, team_note = rename_team(store, state, corrections, stats, early_ms)
        copy_s = plain_copy(store, set_written)  # after every read the checks need
    # Facts at the entry's own rate (MIG instances aside) now cost RATIO of what they did.
    for name, before_usd, before_rows, after_usd, after_rows in checks:
        want = before_usd * RATIO
        if abs(after_usd - want) > 1e-9 * abs(want) or before_usd <= 0 or before_rows != after_rows:
            raise AssertionError(
                f"{name}: ${after_usd} in {after_rows:,} live rows, want ${want} in {before_rows:,}"
            )
    rest_facts = set_written // 2
    base_facts = base_written // 2
    rate = rest_facts / set_s
    base_rate = base_facts / base_s
    show(
        SUMMARY,
        [
            Figure(
                "facts restated per second (set operation in the store)",
                f"{rate:,.0f}",
                f">= {GOAL_FACTS_PER_S:,}",
                rate >= GOAL_FACTS_PER_S,
                f"{base_rate:,.0f} re-costing each sample in Python",
                f"{rate / base_rate:,.0f}x",
                f"{rest_facts:,} facts in {set_s:.2f} s ({set_written:,} rows written)",
            ),
            team_figure,
        ],
        [
            f"baseline: {base_facts:,} facts in {base_s:.2f} s ({base_written:,} rows written)",
            f"the store copying {set_written:,} fact rows into cost_facts and its rollups, "
            f"nothing computed: {copy_s:.2f} s, {set_written / 2 / copy_s:,.0f} facts' two rows "
            f"a second; repricing takes {set_s / copy_s:.1f}x that",
            "dollars checked: live dollars of the scope after = before x the price ratio",
            team_note,
        ],
    )
