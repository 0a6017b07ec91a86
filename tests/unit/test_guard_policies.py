"""Guardrail policies: the file's errors, and the ladder's decisions on generated idle episodes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuledger.ledger.guard import (
    Action,
    Decision,
    Episode,
    Policy,
    PolicyError,
    Step,
    budget_rules_for,
    decide,
    decide_all,
    parse_policies,
    parse_window,
    usd_at_stake,
)
from tests.support import ROOT

T0 = datetime(2026, 3, 4, 10, 0, tzinfo=UTC).timestamp()  # a Wednesday, 10:00 UTC
H100_USD_PER_S = 4.0 / 3600
KEEP_ALIVE = "gpuledger.io/keep-alive"

GOOD = """
[[policy]]
name = "idle-notebooks"
idle_minutes = 30
match = { job_type = "notebook", labels = { env = "dev" } }
exempt = { labels = { "gpuledger.io/keep-alive" = "true" }, windows = ["sat,sun 00:00-24:00"] }
enforce = true
max_actions_per_hour = 2
horizon_hours = 8
steps = [
  { kind = "notify", after_minutes = 0 },
  { kind = "announce", after_minutes = 15, action = "scale_to_zero" },
  { kind = "act", after_minutes = 30, action = "scale_to_zero" },
]
"""


def episode(**fields: object) -> Episode:
    base: dict[str, object] = {
        "gpu_uuid": "GPU-1",
        "node": "n1",
        "idle_since": T0,
        "usd_per_s": H100_USD_PER_S,
        "job_id": "nb-7",
        "team": "research",
        "project": "llm",
        "job_type": "notebook",
        "gpu_model": "H100",
        "labels": {"env": "dev", "k8s_pod": "nb-7-0", "k8s_namespace": "research"},
    }
    return Episode(**{**base, **fields})  # type: ignore[arg-type]


def test_a_good_file_gives_its_policies() -> None:
    (policy,) = parse_policies(GOOD)
    assert policy.name == "idle-notebooks"
    assert policy.enforce and policy.max_actions_per_hour == 2
    assert [s.kind for s in policy.steps] == ["notify", "announce", "act"]
    assert policy.steps[2].action is Action.scale_to_zero
    assert policy.match == {"job_type": "notebook"} and policy.match_labels == {"env": "dev"}


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            ("idle_minutes = 30", "idle_minutes = -1"),
            "policy 'idle-notebooks': field 'idle_minutes'",
        ),
        (("enforce = true", 'enforce = "yes"'), "field 'enforce': true or false (got 'yes')"),
        (('action = "scale_to_zero" },\n]', 'action = "reboot" },\n]'), "steps #3: field 'action'"),
        (('kind = "notify"', 'kind = "email"'), "steps #1: field 'kind'"),
        (('job_type = "notebook"', 'queue = "gpu"'), "field 'match.queue'"),
        (("horizon_hours = 8", "horizon = 8"), "unknown field 'horizon'"),
        (('"sat,sun 00:00-24:00"', '"weekends"'), "field 'exempt.windows' #1"),
        (("after_minutes = 30, action", "after_minutes = 5, action"), "steps go in order of time"),
    ],
)
def test_a_bad_file_names_the_policy_the_field_and_the_value(
    change: tuple[str, str], said: str
) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(PolicyError) as raised:
        parse_policies(text, "policies.toml")
    assert said in str(raised.value)
    assert str(raised.value).startswith("policies.toml: ")


def test_every_problem_of_a_file_is_listed_at_once() -> None:
    text = GOOD.replace("idle_minutes = 30", "idle_minutes = 0").replace(
        "enforce = true", "enforce = 1"
    )
    with pytest.raises(PolicyError) as raised:
        parse_policies(text)
    assert len(str(raised.value).splitlines()) == 2


def test_not_toml_and_no_policy_are_refused() -> None:
    with pytest.raises(PolicyError, match="not TOML"):
        parse_policies("[[policy]\n")
    with pytest.raises(PolicyError, match=r"no \[\[policy\]\] table"):
        parse_policies("")


def test_windows_read_days_and_hours() -> None:
    weekend = parse_window("sat,sun 00:00-24:00")
    assert weekend.days == {5, 6}
    evenings = parse_window("fri-mon 18:00-23:59")  # wraps past Sunday
    assert evenings.days == {4, 5, 6, 0}
    for bad in ("mon-fri", "mon-fri 18:00-08:00", "funday 00:00-01:00", "mon 25:00-26:00"):
        with pytest.raises(ValueError):
            parse_window(bad)


def test_the_ladder_climbs_as_time_passes() -> None:
    (policy,) = parse_policies(GOOD)
    at = T0 + 30 * 60  # idle_minutes reached: notify
    assert [d.kind for d in decide(policy, episode(), [], at)] == ["notify"]
    at = T0 + 60 * 60  # all three due
    got = decide(policy, episode(), [0], at)
    assert [(d.step, d.kind) for d in got] == [(1, "announce"), (2, "act")]
    # The announcement says when the action falls due: 30 min idle, then 30 min more.
    assert got[0].reason.endswith("; scale_to_zero at 2026-03-04T11:00:00Z")
    assert not got[1].dry_run and got[1].action is Action.scale_to_zero
    # The GPU costs 4 $/h; with no job end known, 8 hours of it are at stake.
    assert got[1].usd_at_stake == pytest.approx(32.0)


def test_a_known_job_end_bounds_the_dollars_at_stake() -> None:
    (policy,) = parse_policies(GOOD)
    ending = episode(job_end=T0 + 3 * 3600)
    assert usd_at_stake(policy, ending, T0 + 3600) == pytest.approx(8.0)
    assert usd_at_stake(policy, ending, T0 + 4 * 3600) == 0.0


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"job_id": ""}, "unallocated"),
        ({"team": ""}, "unknown owner"),
        (
            {"labels": {"env": "dev", "k8s_pod": "p", "gpuledger.io/keep-alive": "true"}},
            "keep-alive",
        ),
        ({"idle_since": T0 + 3 * 86400}, "a Saturday"),
        ({"job_type": "training"}, "another job type"),
        ({"labels": {"env": "prod", "k8s_pod": "p"}}, "another label"),
        ({"labels": {"env": "dev", "slurm_user": "ada"}}, "a Slurm job: no pod to scale"),
    ],
)
def test_exempt_unowned_or_unmatched_episodes_get_no_decision(
    fields: dict[str, object], why: str
) -> None:
    (policy,) = parse_policies(GOOD)
    idle = episode(**fields)
    assert decide(policy, idle, [], idle.idle_since + 2 * 3600) == [], why


def test_the_first_matching_policy_decides() -> None:
    (notebooks,) = parse_policies(GOOD)
    anything = Policy("anything", (Step("act", 0, Action.webhook),), idle_minutes=1)
    got = decide_all([notebooks, anything], episode(), {}, T0 + 30 * 60)
    assert {d.policy for d in got} == {"idle-notebooks"}
    got = decide_all([notebooks, anything], episode(job_type="training"), {}, T0 + 60)
    assert [d.policy for d in got] == ["anything"]


# --- properties on generated episodes ---------------------------------------------------------

ladders = st.lists(
    st.tuples(st.sampled_from(["notify", "announce", "act"]), st.integers(0, 120)), min_size=1
).map(
    lambda raw: tuple(
        Step(kind, float(after), None if kind == "notify" else Action.delete_pod)
        for kind, after in sorted(raw, key=lambda s: s[1])
    )
)
policies = st.builds(
    Policy,
    name=st.just("p"),
    steps=ladders,
    idle_minutes=st.integers(1, 90).map(float),
    enforce=st.booleans(),
    max_actions_per_hour=st.integers(1, 5),
)
# Times the guard looks, in minutes after the episode starts (restarts fall between them).
looks = st.lists(st.integers(0, 400), min_size=1, max_size=12).map(sorted)


def run(policy: Policy, idle: Episode, minutes: list[int], kill: bool = False) -> list[Decision]:
    """The guard looking at `minutes`, each time reading back what it recorded (its audit trail),
    as a guard restarted between any two looks does."""
    trail: list[Decision] = []
    for minute in minutes:
        now = idle.idle_since + minute * 60.0
        hour_acts = sum(
            1 for d in trail if d.kind == "act" and not d.dry_run and d.decided_at > now - 3600
        )
        trail += decide(
            policy, idle, [d.step for d in trail], now, acts_last_hour=hour_acts, kill_switch=kill
        )
    return trail


@settings(max_examples=300, deadline=None)
@given(policy=policies, minutes=looks)
def test_a_ladder_never_repeats_or_skips_a_step_across_restarts(
    policy: Policy, minutes: list[int]
) -> None:
    idle = episode()
    trail = run(policy, idle, minutes)
    steps = [d.step for d in trail]
    assert len(steps) == len(set(steps)), "a step was decided twice"
    assert steps == sorted(steps), "a step was decided before an earlier one"
    assert steps == list(range(len(steps))), "a step was skipped"
    # Looking once at the end decides the same steps, unless the rate held some back.
    once = decide(policy, idle, [], idle.idle_since + minutes[-1] * 60.0)
    if not policy.enforce:
        assert [d.step for d in once] == steps


@settings(max_examples=300, deadline=None)
@given(policy=policies, minutes=looks, kill=st.booleans())
def test_nothing_is_done_without_enforce_or_with_the_kill_switch(
    policy: Policy, minutes: list[int], kill: bool
) -> None:
    trail = run(policy, episode(), minutes, kill)
    if not policy.enforce or kill:
        assert all(d.dry_run for d in trail)
    else:
        assert all(not d.dry_run for d in trail)


@settings(max_examples=200, deadline=None)
@given(policy=policies, minutes=looks)
def test_no_hour_holds_more_actions_than_the_policy_allows(
    policy: Policy, minutes: list[int]
) -> None:
    """Many GPUs going idle at once, one guard: the acts it takes stay under the rate."""
    trail: list[Decision] = []
    for minute in minutes:
        for gpu in range(8):
            idle = episode(gpu_uuid=f"GPU-{gpu}")
            now = idle.idle_since + minute * 60.0
            mine = [d.step for d in trail if d.target == idle.target]
            hour_acts = sum(
                1 for d in trail if d.kind == "act" and not d.dry_run and d.decided_at > now - 3600
            )
            trail += decide(policy, idle, mine, now, acts_last_hour=hour_acts)
    acts = sorted(d.decided_at for d in trail if d.kind == "act" and not d.dry_run)
    for i, start in enumerate(acts):
        within = [t for t in acts[i:] if t < start + 3600]
        assert len(within) <= policy.max_actions_per_hour


def test_the_shipped_example_file_is_valid() -> None:
    policies = parse_policies((ROOT / "deploy" / "guard" / "policies.toml").read_text())
    assert {p.name for p in policies} == {
        "idle-notebooks",
        "idle-slurm-training",
        "over-budget-inference",
        "unprofitable-endpoints",
        "orphaned-memory",
    }
    over = next(p for p in policies if p.budget_rules)
    assert over.budget_rules == {"mtd_100", "burn_rate"}
    assert not any(p.enforce for p in policies)  # an example never acts by itself


def test_an_exec_step_needs_its_command() -> None:
    base = GOOD.replace('action = "scale_to_zero" },\n]', 'action = "exec" },\n]')
    with pytest.raises(PolicyError, match="an exec step needs the command to run"):
        parse_policies(base)
    with pytest.raises(PolicyError, match="field 'exec': a command as a list"):
        parse_policies(base.replace("enforce = true", 'enforce = true\nexec = "stop-it"'))
    (policy,) = parse_policies(
        base.replace("enforce = true", 'enforce = true\nexec = ["stop", "-q"]')
    )
    assert policy.exec_command == ("stop", "-q")
    assert policy.steps[2].action is Action.exec_hook


def test_a_budget_rule_is_refused_unless_it_is_one_of_the_four() -> None:
    with pytest.raises(PolicyError) as refused:
        parse_policies(GOOD.replace("enforce = true", 'enforce = true\nbudget = ["mtd_90"]'))
    assert "policy 'idle-notebooks': field 'budget'" in str(refused.value)
    assert "mtd_100" in str(refused.value) and "'mtd_90'" in str(refused.value)


budget_alerts = st.lists(
    st.tuples(
        st.sampled_from(["", "research", "vision"]),
        st.sampled_from(["", "llm", "detector"]),
        st.sampled_from(["mtd_50", "mtd_80", "mtd_100", "burn_rate"]),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(firing=budget_alerts, wanted=st.sets(st.sampled_from(["mtd_100", "burn_rate"])))
def test_a_budget_condition_holds_only_while_a_budget_over_the_job_fires_its_rule(
    firing: list[tuple[str, str, str]], wanted: set[str]
) -> None:
    (policy,) = parse_policies(
        GOOD.replace("enforce = true", f"enforce = true\nbudget = {sorted(wanted)!r}")
    )
    rules = budget_rules_for("research", "llm", firing)
    idle = episode(budget_rules=rules)
    decided = decide(policy, idle, [], T0 + 3 * 3600)
    # By hand: a budget covers the job when its team and project are the job's or empty.
    covering = {r for t, p, r in firing if t in ("", "research") and p in ("", "llm")}
    assert rules == covering
    assert bool(decided) == (not wanted or bool(wanted & covering))


@settings(max_examples=200, deadline=None)
@given(
    condition=st.sampled_from(["idle", "losing_money", "orphaned_memory"]),
    kind=st.sampled_from(["idle", "losing_money", "orphaned_memory"]),
    hours=st.integers(min_value=0, max_value=48),
)
def test_a_policy_acts_only_on_the_kind_of_episode_its_condition_names(
    condition: str, kind: str, hours: int
) -> None:
    (policy,) = parse_policies(
        GOOD.replace("enforce = true", f'enforce = true\ncondition = "{condition}"')
    )
    decided = decide(policy, episode(kind=kind), [], T0 + hours * 3600)
    assert not decided or condition == kind
    if condition == kind and hours >= 2:  # the whole ladder is due by then
        assert [d.kind for d in decided] == ["notify", "announce", "act"]


def test_an_unknown_condition_is_refused() -> None:
    with pytest.raises(
        PolicyError, match="field 'condition': one of idle, losing_money, orphaned_memory"
    ):
        parse_policies(GOOD.replace("enforce = true", 'enforce = true\ncondition = "slow"'))
