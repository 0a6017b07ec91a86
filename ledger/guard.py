"""Guardrail policies and what they decide for an idle GPU, as pure functions (no I/O).

A policy matches idle episodes (team, project, job type, node, GPU model, scheduler, labels)
whose jobs its actions can reach (Kubernetes or Slurm, from the job's labels), waits until
the GPU has been idle for `idle_minutes` (and, optionally, has wasted `min_usd`, or a budget
that covers the job fires one of the `budget` rules), then climbs a
ladder of steps, each `after_minutes` past the start of the ladder: notify the owner, announce
the action with its deadline, act. Nothing is done unless the policy says `enforce = true`:
until then every step is decided and recorded as a dry run, with the dollars it would save.

Safety, decided here so that every caller gets it:

- an episode without a job or a team (an unallocated GPU, an unknown owner) is never acted on;
- a label in `exempt_labels` (e.g. `gpuledger.io/keep-alive = "true"`) or a time in one of
  `exempt_windows` (UTC) exempts the episode: nothing is decided for it;
- at most `max_actions_per_hour` act steps per policy in any hour (notices and dry runs are not
  counted): a step over the rate waits, with the steps after it, for a later decision;
- the kill switch turns every act step into a dry run;
- a step is decided once: the caller hands back the steps already taken for the episode (its
  audit trail), so a restart in the middle of a ladder neither repeats nor skips a step.

A policy with `condition = "losing_money"` matches inference endpoints instead of idle GPUs:
an endpoint whose GPU cost over the last day exceeds what its requests were worth
(`endpoint_margin_daily`) is an episode that started at the beginning of that day, its
`wasted_usd` the day's loss; the same ladder then notifies, announces and acts. With
`condition = "orphaned_memory"`, the episodes are the worker's orphaned_gpu_memory alerts:
a process still holding GPU memory after its job ended (one with no job at all has no owner
to tell or act for, and is left to the alert).

Dollars: a step's `usd_at_stake` is what the GPU would go on costing from the decision until
the job's own end, or for `horizon_hours` when the end is not known (the smaller of the two).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from gpuledger.ledger.budgets import BURN_RATE, LEVELS
from gpuledger.ledger.timekeys import iso_utc

STEP_KINDS = ("notify", "announce", "act")
# What a policy acts on: idle allocated GPUs, inference endpoints that lose money, or
# processes holding GPU memory after their job ended (the worker's orphaned_gpu_memory alerts).
CONDITIONS = ("idle", "losing_money", "orphaned_memory")


class Action(StrEnum):
    """What an act step does, through the interface that owns the workload."""

    scale_to_zero = "scale_to_zero"  # the pod's Deployment or StatefulSet (Kubernetes)
    suspend = "suspend"  # the pod's Job, `spec.suspend` (Kubernetes)
    delete_pod = "delete_pod"  # a bare pod (Kubernetes)
    requeue = "requeue"  # `scontrol requeue` (Slurm)
    cancel = "cancel"  # `scancel` (Slurm)
    webhook = "webhook"  # a POST to the policy's URL
    exec_hook = "exec"  # the policy's command, with the decision in its environment


ACTIONS = tuple(a.value for a in Action)

# The scheduler an action goes through; a policy matches only the jobs its actions can reach.
NEEDS: dict[Action, str] = {
    Action.scale_to_zero: "kubernetes",
    Action.suspend: "kubernetes",
    Action.delete_pod: "kubernetes",
    Action.requeue: "slurm",
    Action.cancel: "slurm",
}


class PolicyError(ValueError):
    """A policies file that cannot be used; the message names each problem's place."""


@dataclass(frozen=True)
class Step:
    kind: str  # notify | announce | act
    after_minutes: float  # past the start of the ladder (the episode's idle_minutes mark)
    action: Action | None = None  # act steps, and announce steps (what will be done)


@dataclass(frozen=True)
class Window:
    """A weekly time window in UTC: days 0 (Monday) to 6, `start` to `end` as HH:MM."""

    days: frozenset[int]
    start_min: int
    end_min: int

    def holds(self, moment: datetime) -> bool:
        minute = moment.hour * 60 + moment.minute
        return moment.weekday() in self.days and self.start_min <= minute < self.end_min


@dataclass(frozen=True)
class Policy:
    name: str
    steps: tuple[Step, ...]
    idle_minutes: float = 30.0
    min_usd: float = 0.0
    match: Mapping[str, str] = field(default_factory=dict)
    match_labels: Mapping[str, str] = field(default_factory=dict)
    exempt_labels: Mapping[str, str] = field(default_factory=dict)
    exempt_windows: tuple[Window, ...] = ()
    enforce: bool = False
    max_actions_per_hour: int = 10
    horizon_hours: float = 24.0
    webhook_url: str = ""
    exec_command: tuple[str, ...] = ()
    # Budget rules (mtd_50, mtd_80, mtd_100, burn_rate) of which one must be firing for the
    # episode's team or project; empty: whatever the budgets say.
    budget_rules: frozenset[str] = frozenset()
    condition: str = "idle"  # one of CONDITIONS


@dataclass(frozen=True)
class Episode:
    """An idle allocated GPU as the guard sees it (from the idle alert and the job's facts)."""

    gpu_uuid: str
    node: str
    idle_since: float
    wasted_usd: float = 0.0
    usd_per_s: float = 0.0  # what the GPU costs its job now
    job_id: str = ""
    team: str = ""
    project: str = ""
    job_type: str = ""
    gpu_model: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    job_end: float | None = None  # the job's own planned end, when its scheduler says it
    # The budget rules firing for a budget that covers the job (its team's, its project's,
    # the fleet's): what a policy's `budget` condition reads.
    budget_rules: frozenset[str] = frozenset()
    kind: str = "idle"  # one of CONDITIONS: an idle GPU, an endpoint losing money, an orphan
    process: str = ""  # an orphan's process (`pid N`): two on one GPU are two targets

    @property
    def target(self) -> str:
        where = f"{self.job_id}@{self.gpu_uuid}"
        return f"{where}/{self.process}" if self.process else where

    @property
    def scheduler(self) -> str:
        """Who runs the job, from the labels its scheduler's integration gave it; '' unknown."""
        if self.labels.get("k8s_pod"):
            return "kubernetes"
        if any(key.startswith("slurm_") for key in self.labels):
            return "slurm"
        return ""


@dataclass(frozen=True)
class Decision:
    policy: str
    target: str
    step: int  # index in the policy's ladder
    kind: str
    action: Action | None
    dry_run: bool
    due_at: float  # when the step fell due (event time)
    decided_at: float
    usd_at_stake: float
    reason: str


MATCH_FIELDS = ("team", "project", "job_type", "node", "gpu_model", "scheduler")
BUDGET_RULES = (*(rule for _, rule in LEVELS), BURN_RATE)
_POLICY_KEYS = {
    "name",
    "idle_minutes",
    "min_usd",
    "match",
    "exempt",
    "enforce",
    "max_actions_per_hour",
    "horizon_hours",
    "webhook_url",
    "exec",
    "budget",
    "condition",
    "steps",
}


# --- the file -------------------------------------------------------------------------------


def parse_policies(text: str, source: str = "policies") -> list[Policy]:
    """The policies of a TOML file (`[[policy]]` tables); PolicyError lists every problem."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not TOML: {exc}") from exc
    problems: list[str] = []
    unknown = set(document) - {"policy"}
    if unknown:
        problems.append(f"{source}: unknown table(s) {sorted(unknown)}: write [[policy]]")
    tables = document.get("policy", [])
    if not isinstance(tables, list) or not tables:
        problems.append(f"{source}: no [[policy]] table")
        tables = []
    policies: list[Policy] = []
    names: set[str] = set()
    for index, table in enumerate(tables, 1):
        where = f"{source}: policy {table.get('name', f'#{index}')!r}"
        found, errors = _policy(table, where)
        problems += errors
        if found is not None:
            if found.name in names:
                problems.append(f"{where}: a second policy of that name")
            names.add(found.name)
            policies.append(found)
    if problems:
        raise PolicyError("\n".join(problems))
    return policies


def _policy(table: Mapping[str, Any], where: str) -> tuple[Policy | None, list[str]]:
    errors = [f"{where}: unknown field {key!r}" for key in sorted(set(table) - _POLICY_KEYS)]
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"{where}: field 'name': give the policy a name (got {name!r})")
    numbers = {}
    for key, default, low in (
        ("idle_minutes", 30.0, 1.0),
        ("min_usd", 0.0, 0.0),
        ("max_actions_per_hour", 10, 1),
        ("horizon_hours", 24.0, 0.0),
    ):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
            errors.append(f"{where}: field {key!r}: a number ≥ {low} (got {value!r})")
        numbers[key] = value
    enforce = table.get("enforce", False)
    if not isinstance(enforce, bool):
        errors.append(f"{where}: field 'enforce': true or false (got {enforce!r})")
    match, match_labels = _match(table.get("match", {}), where, errors)
    exempt_labels, windows = _exempt(table.get("exempt", {}), where, errors)
    steps = _steps(table.get("steps"), where, errors)
    webhook_url = table.get("webhook_url", "")
    if any(s.action is Action.webhook for s in steps) and not str(webhook_url).startswith(
        ("http://", "https://")
    ):
        errors.append(f"{where}: field 'webhook_url': a webhook step needs an http(s) URL")
    command = table.get("exec", [])
    if not isinstance(command, list) or not all(isinstance(a, str) and a for a in command):
        errors.append(
            f"{where}: field 'exec': a command as a list, e.g. [\"/usr/local/bin/stop-job\"]"
        )
        command = []
    if any(s.action is Action.exec_hook for s in steps) and not command:
        errors.append(f"{where}: field 'exec': an exec step needs the command to run")
    budget = _budget(table.get("budget", []), where, errors)
    condition = table.get("condition", "idle")
    if condition not in CONDITIONS:
        errors.append(
            f"{where}: field 'condition': one of {', '.join(CONDITIONS)} (got {condition!r})"
        )
    if errors:
        return None, errors
    policy = Policy(
        name=str(name),
        steps=tuple(steps),
        idle_minutes=float(numbers["idle_minutes"]),
        min_usd=float(numbers["min_usd"]),
        match=match,
        match_labels=match_labels,
        exempt_labels=exempt_labels,
        exempt_windows=tuple(windows),
        enforce=enforce,
        max_actions_per_hour=int(numbers["max_actions_per_hour"]),
        horizon_hours=float(numbers["horizon_hours"]),
        webhook_url=str(webhook_url),
        exec_command=tuple(command),
        budget_rules=budget,
        condition=str(condition),
    )
    return policy, []


def _budget(value: Any, where: str, errors: list[str]) -> frozenset[str]:
    if not isinstance(value, list) or not all(rule in BUDGET_RULES for rule in value):
        errors.append(
            f"{where}: field 'budget': a list of budget rules among {', '.join(BUDGET_RULES)}, "
            f'e.g. ["mtd_100", "burn_rate"] (got {value!r})'
        )
        return frozenset()
    return frozenset(value)


def _match(value: Any, where: str, errors: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    if not isinstance(value, dict):
        errors.append(f"{where}: field 'match': a table (got {value!r})")
        return {}, {}
    match: dict[str, str] = {}
    for key, wanted in value.items():
        if key == "labels":
            continue
        if key not in MATCH_FIELDS:
            errors.append(f"{where}: field 'match.{key}': one of {', '.join(MATCH_FIELDS)}")
        elif not isinstance(wanted, str) or not wanted:
            errors.append(f"{where}: field 'match.{key}': a non-empty string (got {wanted!r})")
        else:
            match[key] = wanted
    return match, _labels(value.get("labels", {}), f"{where}: field 'match.labels'", errors)


def _labels(value: Any, where: str, errors: list[str]) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        errors.append(f'{where}: a table of strings, e.g. {{ "gpuledger.io/keep-alive" = "true" }}')
        return {}
    return dict(value)


def _exempt(value: Any, where: str, errors: list[str]) -> tuple[dict[str, str], list[Window]]:
    if not isinstance(value, dict):
        errors.append(f"{where}: field 'exempt': a table (got {value!r})")
        return {}, []
    for key in sorted(set(value) - {"labels", "windows"}):
        errors.append(f"{where}: unknown field 'exempt.{key}': labels or windows")
    labels = _labels(value.get("labels", {}), f"{where}: field 'exempt.labels'", errors)
    windows = []
    for n, raw in enumerate(value.get("windows", []), 1):
        try:
            windows.append(parse_window(raw))
        except ValueError as exc:
            errors.append(f"{where}: field 'exempt.windows' #{n}: {exc} (got {raw!r})")
    return labels, windows


_DAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


def parse_window(text: Any) -> Window:
    """`"mon-fri 18:00-23:59"` or `"sat,sun 00:00-24:00"` (UTC)."""
    if not isinstance(text, str) or len(text.split()) != 2:
        raise ValueError('write days and hours, e.g. "mon-fri 18:00-23:59"')
    days_text, hours_text = text.lower().split()
    days: set[int] = set()
    for part in days_text.split(","):
        first, _, last = part.partition("-")
        if first not in _DAYS or (last and last not in _DAYS):
            raise ValueError(f"unknown day in {part!r}: mon, tue, wed, thu, fri, sat, sun")
        a, b = _DAYS[first], _DAYS[last or first]
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    start, _, end = hours_text.partition("-")
    start_min, end_min = _minute(start), _minute(end)
    if end_min <= start_min:
        raise ValueError("the window must end after it starts (split one that spans midnight)")
    return Window(frozenset(days), start_min, end_min)


def _minute(text: str) -> int:
    hours, _, minutes = text.partition(":")
    if not (hours.isdigit() and minutes.isdigit() and len(minutes) == 2):
        raise ValueError(f"time {text!r} is not HH:MM")
    value = int(hours) * 60 + int(minutes)
    if value > 24 * 60 or int(minutes) > 59:
        raise ValueError(f"time {text!r} is not in 00:00-24:00")
    return value


def _steps(value: Any, where: str, errors: list[str]) -> list[Step]:
    if not isinstance(value, list) or not value:
        errors.append(f"{where}: field 'steps': a list of {{ kind, after_minutes[, action] }}")
        return []
    steps: list[Step] = []
    for n, raw in enumerate(value, 1):
        at = f"{where}: steps #{n}"
        if not isinstance(raw, dict):
            errors.append(f"{at}: a table (got {raw!r})")
            continue
        kind, after, action = raw.get("kind"), raw.get("after_minutes", 0), raw.get("action")
        if kind not in STEP_KINDS:
            errors.append(f"{at}: field 'kind': one of {', '.join(STEP_KINDS)} (got {kind!r})")
            continue
        if isinstance(after, bool) or not isinstance(after, int | float) or after < 0:
            errors.append(f"{at}: field 'after_minutes': a number ≥ 0 (got {after!r})")
            continue
        if steps and after < steps[-1].after_minutes:
            errors.append(f"{at}: field 'after_minutes': steps go in order of time")
        parsed: Action | None = None
        if kind != "notify":
            if not isinstance(action, str) or action not in ACTIONS:
                choices = ", ".join(ACTIONS)
                errors.append(f"{at}: field 'action': one of {choices} (got {action!r})")
                continue
            parsed = Action(action)
        steps.append(Step(kind, float(after), parsed))
    if len(steps) == len(value) and not any(s.kind == "act" for s in steps):
        errors.append(f"{where}: field 'steps': no act step (notices alone are an alert rule)")
    return steps


# --- decisions ------------------------------------------------------------------------------


def matches(policy: Policy, episode: Episode) -> bool:
    """The policy's scope holds the episode, and every action of its ladder can reach the job
    (a Slurm job is never scaled to zero, a pod never requeued)."""
    if policy.condition != episode.kind:
        return False
    for step in policy.steps:
        needed = NEEDS.get(step.action) if step.action else None
        if needed and episode.scheduler != needed:
            return False
    for key, wanted in policy.match.items():
        if getattr(episode, key) != wanted:
            return False
    if policy.budget_rules and not policy.budget_rules & episode.budget_rules:
        return False
    return all(episode.labels.get(k) == v for k, v in policy.match_labels.items())


def budget_rules_for(
    team: str, project: str, firing: Iterable[tuple[str, str, str]]
) -> frozenset[str]:
    """The rules of the firing budget alerts `(team, project, rule)` whose budget covers a job
    of `team` and `project`: an empty team or project in a budget matches any."""
    return frozenset(rule for t, p, rule in firing if t in ("", team) and p in ("", project))


def exemption(policy: Policy, episode: Episode, now: float) -> str | None:
    """Why nothing may be decided for this episode now, or None."""
    if not episode.job_id or not episode.team:
        return "unallocated GPU or unknown owner"
    for key, value in policy.exempt_labels.items():
        if episode.labels.get(key) == value:
            return f"exempt by label {key}={value}"
    moment = datetime.fromtimestamp(now, UTC)
    if any(window.holds(moment) for window in policy.exempt_windows):
        return "exempt by time window"
    return None


def usd_at_stake(policy: Policy, episode: Episode, now: float) -> float:
    """What the GPU would go on costing from `now` to the job's end (or the horizon)."""
    horizon = policy.horizon_hours * 3600.0
    left = horizon if episode.job_end is None else min(horizon, max(0.0, episode.job_end - now))
    return episode.usd_per_s * left


def decide(
    policy: Policy,
    episode: Episode,
    taken: Iterable[int],
    now: float,
    *,
    acts_last_hour: int = 0,
    kill_switch: bool = False,
) -> list[Decision]:
    """The steps of `policy`'s ladder due for `episode` at `now` and not `taken` yet, in order.

    `taken` are the step indices already recorded for this episode and policy (its audit
    trail); `acts_last_hour` counts the policy's act steps in the hour before `now`."""
    if not matches(policy, episode) or exemption(policy, episode, now) is not None:
        return []
    if episode.wasted_usd < policy.min_usd:
        return []
    start = episode.idle_since + policy.idle_minutes * 60.0
    done = set(taken)
    decisions: list[Decision] = []
    for index, step in enumerate(policy.steps):
        due_at = start + step.after_minutes * 60.0
        if due_at > now:
            break  # later steps are due later still
        if index in done:
            continue
        dry_run = not policy.enforce or kill_switch
        acts = step.kind == "act" and not dry_run
        if acts and acts_last_hour >= policy.max_actions_per_hour:
            break  # over the policy's rate: the step waits for a later decision
        acts_last_hour += acts
        reason = _reason(episode, now)
        if step.kind == "announce":
            reason += _deadline(policy, start, index)
        if step.kind == "act" and kill_switch:
            reason += "; kill switch on"
        decisions.append(
            Decision(
                policy=policy.name,
                target=episode.target,
                step=index,
                kind=step.kind,
                action=step.action,
                dry_run=dry_run,
                due_at=due_at,
                decided_at=now,
                usd_at_stake=usd_at_stake(policy, episode, now),
                reason=reason,
            )
        )
    return decisions


def decide_all(
    policies: Sequence[Policy],
    episode: Episode,
    taken: Mapping[str, Iterable[int]],
    now: float,
    *,
    acts_last_hour: Mapping[str, int] | None = None,
    kill_switch: bool = False,
) -> list[Decision]:
    """The first matching policy decides (the file's order is the precedence)."""
    for policy in policies:
        if matches(policy, episode):
            return decide(
                policy,
                episode,
                taken.get(policy.name, ()),
                now,
                acts_last_hour=(acts_last_hour or {}).get(policy.name, 0),
                kill_switch=kill_switch,
            )
    return []


def _deadline(policy: Policy, start: float, announced: int) -> str:
    """When the act step after an announcement falls due: the deadline it announces."""
    for step in policy.steps[announced + 1 :]:
        if step.kind == "act":
            when = start + step.after_minutes * 60.0
            return f"; {step.action.value if step.action else 'act'} at {iso_utc(when)}"
    return ""


def _reason(episode: Episode, now: float) -> str:
    if episode.kind == "orphaned_memory":
        return (
            f"{episode.process} holds GPU memory after its job ended, since "
            f"{iso_utc(episode.idle_since)} (${episode.wasted_usd:,.2f} of GPU time)"
        )
    if episode.kind == "losing_money":
        return (
            f"requests worth less than their GPU cost since {iso_utc(episode.idle_since)} "
            f"(${episode.wasted_usd:,.2f} lost)"
        )
    return f"idle since {iso_utc(episode.idle_since)} ({(now - episode.idle_since) / 60:.0f} min)"
