"""Idle allocated GPU episodes (ARCHITECTURE.md §3.6) decided on event time, without I/O.

Dollars are worked out by hand: every GPU here costs $4.00 an hour, so an idle second at
util_sm 0.01 wastes 4 / 3600 * 0.99 dollars.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuledger.ledger.idle import AlertEvent, IdleGap, IdleTracker
from gpuledger.ledger.idle_rules import IdlePolicy, IdleRule, IdleRulesError, parse_idle_rules
from gpuledger.schema.messages import AlertState, CostFact

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
USD_PER_HOUR = 4.0
IDLE_UTIL = 0.01
BUSY_UTIL = 0.8
DEFAULT = IdleRule(idle_threshold=0.05, alert_after_s=600.0, resolve_after_s=60.0)
POLICY = IdlePolicy(default=DEFAULT, update_every_s=0.0)


def fact(
    ts: float,
    util: float | None,
    *,
    gpu: str = "GPU-a",
    job: str = "job-1",
    d: float = 1.0,
    team: str = "vision",
    job_type: str = "training",
    share: float = 1.0,
) -> CostFact:
    cost = USD_PER_HOUR * d / 3600 * share
    return CostFact(
        ts=ts,
        node="node-1",
        gpu_uuid=gpu,
        gpu_model="H100",
        job_id=job,
        team=team if job else "",
        project="detector" if job else "",
        job_type=job_type if job else "",
        duration_s=d,
        share=share,
        util_sm=util,
        usd_per_gpu_hour=USD_PER_HOUR,
        cost_usd=cost,
        idle_cost_usd=0.0 if util is None else cost * (1 - util),
        allocated=1 if job else 0,
        idle=1 if job and util is not None and util < 0.05 else 0,
        price_missing=0,
    )


def run(seconds: Iterable[tuple[float, float | None]], **kw: object) -> list[CostFact]:
    return [fact(T0 + s, u, **kw) for s, u in seconds]  # type: ignore[arg-type]


def idle_for(start: int, stop: int, **kw: object) -> list[CostFact]:
    return run(((s, IDLE_UTIL) for s in range(start, stop)), **kw)


def busy_for(start: int, stop: int, **kw: object) -> list[CostFact]:
    return run(((s, BUSY_UTIL) for s in range(start, stop)), **kw)


def wasted(seconds: float) -> float:
    return USD_PER_HOUR / 3600 * (1 - IDLE_UTIL) * seconds


def states(events: Sequence[AlertEvent]) -> list[tuple[str, str, float]]:
    return [(e.alert.gpu_uuid, e.alert.state.value, e.alert.ts - T0) for e in events]


def test_idle_for_601_seconds_fires_exactly_one_alert_with_the_wasted_dollars() -> None:
    events = IdleTracker(POLICY).observe(idle_for(0, 601))
    assert len(events) == 1
    alert = events[0].alert
    assert alert.state is AlertState.firing and events[0].notify
    assert (alert.ts, alert.since, alert.idle_seconds) == (T0 + 600, T0, 600.0)
    assert alert.wasted_usd == pytest.approx(wasted(600), rel=1e-12)
    assert (alert.job_id, alert.team, alert.project, alert.node) == (
        "job-1",
        "vision",
        "detector",
        "node-1",
    )
    assert "GPU-a" in alert.message and "$0.66" in alert.message


def test_busy_again_at_590_seconds_raises_nothing() -> None:
    tracker = IdleTracker(POLICY)
    assert tracker.observe(idle_for(0, 590) + busy_for(590, 700)) == []
    assert tracker.episodes == {}


def test_one_busy_sample_before_firing_starts_the_count_again() -> None:
    tracker = IdleTracker(POLICY)
    events = tracker.observe(idle_for(0, 500) + busy_for(500, 501) + idle_for(501, 1101))
    assert states(events) == [("GPU-a", "firing", 1101)]
    assert events[0].alert.since == T0 + 501


def test_a_burst_after_firing_does_not_flap_the_alert() -> None:
    tracker = IdleTracker(POLICY)
    events = tracker.observe(idle_for(0, 600) + busy_for(600, 630) + idle_for(630, 700))
    assert states(events) == [("GPU-a", "firing", 600)]
    # The burst's 30 s are not idle time; the episode goes on counting after it.
    assert tracker.firing()[0].alert.idle_seconds == 670


def test_busy_for_the_resolve_time_resolves_at_the_start_of_the_busy_spell() -> None:
    events = IdleTracker(POLICY).observe(idle_for(0, 700) + busy_for(700, 760))
    assert states(events) == [("GPU-a", "firing", 600), ("GPU-a", "resolved", 700)]
    resolved = events[1].alert
    assert resolved.idle_seconds == 700 and resolved.since == T0
    assert resolved.wasted_usd == pytest.approx(wasted(700), rel=1e-12)
    assert "busy again" in resolved.message and events[1].notify


def test_the_job_ending_while_idle_resolves_its_alert_at_the_jobs_end() -> None:
    tracker = IdleTracker(POLICY)
    events = tracker.observe(idle_for(0, 700))
    events += tracker.job_changed("job-1", T0 + 700)
    # The GPU goes on, unallocated and idle: that is nobody's alert.
    events += tracker.observe(idle_for(700, 800, job=""))
    assert states(events) == [("GPU-a", "firing", 600), ("GPU-a", "resolved", 700)]
    assert "job ended" in events[1].alert.message


def test_a_job_end_known_before_its_samples_resolves_when_they_pass_it() -> None:
    """A replay: the scheduler's events are read before the samples."""
    tracker = IdleTracker(POLICY)
    assert tracker.job_changed("job-1", T0 + 700) == []
    events = tracker.observe(idle_for(0, 700) + idle_for(700, 720, job=""))
    assert states(events) == [("GPU-a", "firing", 600), ("GPU-a", "resolved", 700)]


def test_a_job_end_after_its_last_sample_resolves_at_once() -> None:
    tracker = IdleTracker(POLICY)
    tracker.observe(idle_for(0, 650))
    events = tracker.job_changed("job-1", T0 + 650)
    assert states(events) == [("GPU-a", "resolved", 650)]


def test_an_ended_job_on_a_gpu_that_went_silent_resolves_at_the_jobs_end() -> None:
    tracker = IdleTracker(POLICY)
    tracker.observe(idle_for(0, 650))
    assert tracker.job_changed("job-1", T0 + 700) == []  # its last 50 s may still come
    # Other GPUs' event time says nothing (it may be a backfill): only silence does.
    assert tracker.observe(busy_for(0, 2000, gpu="GPU-other")) == []
    assert tracker.gpus_with_ended_jobs() == {"GPU-a"}
    assert states(tracker.expire(["GPU-a"])) == [("GPU-a", "resolved", 700)]
    assert tracker.gpus_with_ended_jobs() == set()


def test_another_job_taking_the_gpu_resolves_the_old_jobs_alert() -> None:
    tracker = IdleTracker(POLICY)
    events = tracker.observe(idle_for(0, 620) + busy_for(620, 630, job="job-2"))
    assert [(e.alert.job_id, e.alert.state.value, e.alert.ts - T0) for e in events] == [
        ("job-1", "firing", 600),
        ("job-1", "resolved", 620),
    ]
    assert "no longer holds" in events[1].alert.message


def test_a_job_with_two_idle_gpus_raises_two_alerts() -> None:
    facts = idle_for(0, 601, gpu="GPU-a") + idle_for(0, 601, gpu="GPU-b")
    events = IdleTracker(POLICY).observe(facts)
    assert sorted(states(events)) == [("GPU-a", "firing", 600), ("GPU-b", "firing", 600)]


def test_an_idle_unallocated_gpu_raises_nothing() -> None:
    assert IdleTracker(POLICY).observe(idle_for(0, 2000, job="")) == []


def test_a_mig_instance_without_utilization_is_never_idle() -> None:
    facts = run((s, None) for s in range(0, 2000))
    assert IdleTracker(POLICY).observe(facts) == []


def test_sm_activity_makes_a_tiny_kernel_gpu_idle_for_the_rules_that_judge_by_it() -> None:
    rules = parse_idle_rules(
        '[[rule]]\nteam = "search"\nutilization = "sm_active"\n', DEFAULT, "rules.toml"
    )
    policy = IdlePolicy(default=DEFAULT, rules=tuple(rules), update_every_s=0.0)
    spinning = []
    for team, gpu in (("search", "GPU-s"), ("vision", "GPU-v")):
        for s in range(0, 601):
            f = fact(T0 + s, 0.99, gpu=gpu, team=team)
            spinning.append(f.model_copy(update={"sm_active": 0.02}))
    events = IdleTracker(policy).observe(spinning)
    # busy 99 % of the time on 2 % of its SMs: idle for the team that judges SM activity
    assert states(events) == [("GPU-s", "firing", 600)]
    # the dollars are the facts' own idle cost (what the cost model's idle basis priced)
    assert events[0].alert.wasted_usd == pytest.approx(600 * USD_PER_HOUR / 3600 * 0.01)
    # a GPU without GPM (no sm_active) is judged by its busy time under the same rule
    no_gpm = run(((s, 0.9) for s in range(0, 700)), team="search", gpu="GPU-o")
    assert IdleTracker(policy).observe(no_gpm) == []


def test_a_mig_slice_idle_by_its_sm_activity_fires_like_a_gpu() -> None:
    # the agent gives a MIG instance its SM activity as util_sm: an idle slice is idle
    facts = run(((s, 0.0) for s in range(0, 601)), gpu="MIG-1")
    facts = [f.model_copy(update={"sm_active": 0.0, "mig_profile": "1g.10gb"}) for f in facts]
    assert states(IdleTracker(POLICY).observe(facts)) == [("MIG-1", "firing", 600)]


def test_two_jobs_sharing_an_idle_gpu_each_get_their_share_of_the_waste() -> None:
    facts = [
        f
        for s in range(0, 601)
        for f in (
            fact(T0 + s, IDLE_UTIL, job="job-1", share=0.25),
            fact(T0 + s, IDLE_UTIL, job="job-2", share=0.75),
        )
    ]
    events = IdleTracker(POLICY).observe(facts)
    by_job = {e.alert.job_id: e.alert.wasted_usd for e in events}
    assert by_job == {
        "job-1": pytest.approx(wasted(600) * 0.25),
        "job-2": pytest.approx(wasted(600) * 0.75),
    }


def test_firing_updates_carry_the_dollars_so_far_without_notifying() -> None:
    policy = IdlePolicy(default=DEFAULT, update_every_s=60.0)
    events = IdleTracker(policy).observe(idle_for(0, 730))
    assert [(e.alert.ts - T0, e.notify) for e in events] == [
        (600, True),
        (660, False),
        (720, False),
    ]
    assert events[-1].alert.wasted_usd == pytest.approx(wasted(720))
    assert {e.fired_at for e in events} == {T0 + 600}


def test_ten_second_samples_add_up_like_one_second_samples() -> None:
    facts = [fact(T0 + s, IDLE_UTIL, d=10.0) for s in range(0, 610, 10)]
    events = IdleTracker(POLICY).observe(facts)
    assert states(events) == [("GPU-a", "firing", 600)]
    assert events[0].alert.wasted_usd == pytest.approx(wasted(600))


def test_a_late_sample_does_not_rewrite_an_episode() -> None:
    tracker = IdleTracker(POLICY)
    tracker.observe(idle_for(0, 300))
    assert tracker.observe(busy_for(100, 101)) == []
    assert tracker.episodes[("GPU-a", "job-1")].idle_seconds == 300


# -- thresholds per team and job type --------------------------------------------------
RULES = """
[[rule]]
job_type = "notebook"
idle_alert_after_s = 1800

[[rule]]
team = "research"
idle_threshold = 0.2

[[rule]]
team = "research"
job_type = "notebook"
idle_alert_after_s = 120
"""


def test_the_most_specific_rule_sets_a_jobs_thresholds() -> None:
    policy = IdlePolicy(default=DEFAULT, rules=tuple(parse_idle_rules(RULES, DEFAULT)))
    assert policy.rule_for("vision", "training") == DEFAULT
    assert policy.rule_for("vision", "notebook").alert_after_s == 1800
    research = policy.rule_for("research", "training")
    assert (research.idle_threshold, research.alert_after_s) == (0.2, 600)
    both = policy.rule_for("research", "notebook")
    assert (both.idle_threshold, both.alert_after_s) == (0.05, 120)


def test_a_teams_own_threshold_decides_what_idle_means_for_it() -> None:
    policy = IdlePolicy(
        default=DEFAULT, rules=tuple(parse_idle_rules(RULES, DEFAULT)), update_every_s=0.0
    )
    tracker = IdleTracker(policy)
    at_15_percent = run(((s, 0.15) for s in range(0, 601)), team="research")
    at_15_percent += run(((s, 0.15) for s in range(0, 601)), team="vision", gpu="GPU-b")
    assert states(tracker.observe(at_15_percent)) == [("GPU-a", "firing", 600)]
    notebook = run(((s, 0.0) for s in range(0, 200)), gpu="GPU-n", job_type="notebook")
    assert states(tracker.observe(notebook)) == []  # 30 minutes for notebooks


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[[rule]]\nidle_threshold = 0.1\n", "rule 1: give a team, a job_type or both"),
        ('[[rule]]\nteam = "a"\nidle_threshold = 5\n', "idle_threshold must be in 0..1, got 5"),
        (
            '[[rule]]\nteam = "a"\nidle_alert_after_s = "ten"\n',
            "idle_alert_after_s must be a number, got 'ten'",
        ),
        ('[[rule]]\nteam = "a"\nafter = 3\n', "unknown field(s) ['after']"),
        ("[rules]\n", "unknown table(s) ['rules']"),
        (
            '[[rule]]\nteam = "a"\nutilization = "sm"\n',
            "utilization must be one of ['busy_time', 'sm_active'], got 'sm'",
        ),
        ("[[rule]\n", "not valid TOML"),
    ],
)
def test_a_bad_rules_file_names_the_rule_the_field_and_the_value(text: str, error: str) -> None:
    with pytest.raises(IdleRulesError, match=None) as info:
        parse_idle_rules(text, DEFAULT, "rules.toml")
    assert error in str(info.value) and "rules.toml" in str(info.value)


# -- replay and restart ------------------------------------------------------------------
SMALL = IdlePolicy(
    default=IdleRule(idle_threshold=0.05, alert_after_s=100.0, resolve_after_s=30.0),
    update_every_s=40.0,
)

# One GPU's story in 10-second samples: spells of (util, which job holds it, how many samples).
spell = st.tuples(
    st.sampled_from([0.0, 0.01, 0.04, 0.3, 0.9, None]),
    st.sampled_from(["job-1", "job-1", "job-1", "job-2", ""]),
    st.integers(min_value=1, max_value=25),
)
stories = st.lists(spell, min_size=1, max_size=12).map(
    lambda spells: [(util, job) for util, job, n in spells for _ in range(n)][:150]
)


def story_facts(story: Sequence[tuple[float | None, str]], gpu: str) -> list[CostFact]:
    return [
        fact(T0 + 10 * i, util, gpu=gpu, job=job, d=10.0) for i, (util, job) in enumerate(story)
    ]


def rows(events: Iterable[AlertEvent]) -> list[tuple[object, ...]]:
    return [
        (*e.identity, e.alert.since, e.alert.idle_seconds, round(e.alert.wasted_usd, 9), e.notify)
        for e in events
    ]


@settings(max_examples=150, deadline=None)
@given(stories, stories, st.lists(st.integers(min_value=1, max_value=60), max_size=10))
def test_a_replay_fires_the_same_alerts_at_the_same_times_whatever_the_batching(
    story_a: list[tuple[float | None, str]],
    story_b: list[tuple[float | None, str]],
    cuts: list[int],
) -> None:
    facts = story_facts(story_a, "GPU-a") + story_facts(story_b, "GPU-b")
    facts.sort(key=lambda f: f.ts)  # as the stream interleaves them
    whole = IdleTracker(SMALL).observe(facts)
    live = IdleTracker(SMALL)
    batched: list[AlertEvent] = []
    i = 0
    for size in [*cuts, len(facts)]:
        batched += live.observe(facts[i : i + size])
        i += size
    assert sorted(rows(batched), key=str) == sorted(rows(whole), key=str)


def gap_from_store(
    stored: Sequence[CostFact], gpu: str, job: str, start: float, stop: float, rule: IdleRule
) -> IdleGap:
    """What the worker sums in SQL for a firing episode whose latest row predates the tail."""
    idle = [
        f
        for f in stored
        if f.gpu_uuid == gpu
        and f.job_id == job
        and start <= f.ts < stop
        and f.util_sm is not None
        and f.util_sm < rule.idle_threshold
    ]
    return IdleGap(sum(f.duration_s for f in idle), sum(f.idle_cost_usd for f in idle), stop)


def restarted(
    stored: Sequence[CostFact],
    recorded: Sequence[AlertEvent],
    policy: IdlePolicy,
    lookback: float = -math.inf,
) -> tuple[IdleTracker, list[AlertEvent]]:
    """A worker restarted on this store, as streams/alerting.py rebuilds it: the latest
    alert row of each episode, each GPU's facts since its last horizon (or since its firing
    episode's latest row, when older), and idle sums for rows older than the lookback."""
    latest: dict[tuple[str, str], AlertEvent] = {}
    for event in recorded:
        latest[(event.alert.gpu_uuid, event.alert.job_id)] = event
    start = max(max(f.ts + f.duration_s for f in stored) - policy.horizon_s(), lookback)
    gaps = {}
    for key, e in latest.items():
        if e.alert.state is AlertState.firing:
            if e.alert.ts < lookback:
                gaps[key] = gap_from_store(stored, *key, e.alert.ts, lookback, policy.default)
                start = lookback
            else:
                start = min(start, e.alert.ts)
    tracker = IdleTracker(policy)
    owed = tracker.restore(
        latest=latest.values(),
        gaps=gaps,
        tail=[f for f in stored if f.ts >= start],
        recorded={e.identity for e in recorded if e.alert.ts >= start},
    )
    return tracker, owed


@settings(max_examples=150, deadline=None)
@given(stories, st.integers(min_value=1, max_value=149), st.booleans())
def test_a_restart_anywhere_gives_the_alerts_of_an_uninterrupted_run(
    story: list[tuple[float | None, str]], cut: int, lose_last_alert: bool
) -> None:
    facts = story_facts(story, "GPU-a")
    cut = min(cut, len(facts))
    whole = IdleTracker(SMALL).observe(facts)

    before = IdleTracker(SMALL).observe(facts[:cut])
    # A crash between storing the facts and storing their alert loses that alert row.
    recorded = before[:-1] if lose_last_alert else before
    tracker, owed = restarted(facts[:cut], recorded, SMALL) if cut else (IdleTracker(SMALL), [])
    after = tracker.observe(facts[cut:])
    assert rows(recorded + owed + after) == rows(whole)


def test_a_long_firing_episode_survives_a_restart_with_its_dollars() -> None:
    """Updates off, and the alert older than the restart's lookback: the idle time between
    the alert and the lookback is summed from the store, the rest replayed."""
    policy = IdlePolicy(default=DEFAULT, update_every_s=0.0)
    stored = [fact(T0 + s, IDLE_UTIL, d=10.0) for s in range(0, 5000, 10)]
    recorded = IdleTracker(policy).observe(stored)
    assert states(recorded) == [("GPU-a", "firing", 600)]
    tracker, owed = restarted(stored, recorded, policy, lookback=T0 + 3000)
    assert owed == []
    after = tracker.observe([fact(T0 + s, BUSY_UTIL, d=10.0) for s in range(5000, 5060, 10)])
    assert states(after) == [("GPU-a", "resolved", 5000)]
    assert after[0].alert.idle_seconds == 5000
    assert after[0].alert.wasted_usd == pytest.approx(wasted(5000))
    assert after[0].alert.since == T0 and after[0].fired_at == T0 + 600


# -- late metadata ---------------------------------------------------------------------------


def test_a_job_start_that_arrives_after_its_samples_fires_once_they_are_restated() -> None:
    tracker = IdleTracker(POLICY)
    # The samples came first: costed as nobody's, they raise nothing.
    assert tracker.observe(idle_for(0, 700, job="")) == []
    tracker.job_changed("job-1", math.inf, start=T0, gpus=["GPU-a"], job_type="training")
    assert tracker.stale == {"GPU-a"}
    # The worker restates them to the job; GPU-a starts over from the corrected store.
    events = tracker.rebuild(["GPU-a"], tail=idle_for(0, 700), gaps={})
    assert states(events) == [("GPU-a", "firing", 600)]
    assert events[0].alert.since == T0 and events[0].alert.idle_seconds == 600
    assert tracker.stale == set()
    assert tracker.observe(idle_for(700, 800)) == []  # and goes on without a repeat
    assert tracker.firing()[0].alert.idle_seconds == 800


def test_a_job_start_before_its_samples_marks_nothing_stale() -> None:
    tracker = IdleTracker(POLICY)
    tracker.observe(busy_for(0, 10, job=""))
    tracker.job_changed("job-1", math.inf, start=T0 + 10, gpus=["GPU-a"])
    tracker.job_changed("job-1", T0 + 900, start=T0 + 10, gpus=["GPU-a"])  # ends on time
    assert tracker.stale == set()


def test_rebuilding_a_gpu_repeats_none_of_its_alerts() -> None:
    policy = IdlePolicy(default=DEFAULT, update_every_s=60.0)
    tracker = IdleTracker(policy)
    facts = idle_for(0, 700) + busy_for(700, 760) + idle_for(760, 1500)
    emitted = tracker.observe(facts)
    assert len(emitted) == 6  # fired, 1 update, resolved; fired again, 1 update... and more
    assert tracker.rebuild(["GPU-a"], tail=facts, gaps={}) == []
    more = tracker.observe(idle_for(1500, 1600))
    whole = IdleTracker(policy).observe(facts + idle_for(1500, 1600))
    assert rows(emitted + more) == rows(whole)


def test_policy_horizon_outlasts_any_episode_not_yet_fired() -> None:
    assert POLICY.horizon_s() > DEFAULT.alert_after_s + DEFAULT.resolve_after_s
    assert not math.isinf(POLICY.horizon_s())
