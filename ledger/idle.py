"""Idle allocated GPU episodes (ARCHITECTURE.md §3.5-3.6) as a state machine on event time, no I/O.

An episode belongs to one (GPU, job) pair. It starts with the first sample in which an
allocated GPU's `util_sm` is under the idle threshold and fires once the GPU has stayed idle
for `alert_after_s` without a break: before it fires, any busy sample ends it, silently (as
a Prometheus rule's `for:`). Once fired it ends only when the GPU has been busy for
`resolve_after_s` in a row (hysteresis, as `keep_firing_for:`: a burst does not flap it), or
when the job no longer holds the GPU (it ended, or another job took the GPU). A fired
episode says so when it fires and when it ends; in between, every `update_every_s` of event
time, a firing update carries the idle seconds and dollars so far.

Decisions (where the contract leaves a choice):

- **Counting.** `idle_seconds` adds up the durations of the idle samples; `wasted_usd` adds
  their `idle_cost_usd` (the job's share of the GPU's cost times `1 - util_sm`, as in the
  `idle_waste` view). Busy samples of a fired episode and gaps without samples count for
  neither. A sample without `util_sm` (a MIG instance) is neither idle nor busy for the jobs
  it carries; a sample that does not carry the job (another job, or nobody, holds the GPU)
  ends the job's episode, with or without a `util_sm`.
- **Times.** The firing alert's `ts` is the end of the sample that crossed the threshold; an
  update's, the end of its sample; a resolution's, the start of the busy spell that ended
  the episode, or the job's end (else the first sample without the job).
- **Order.** A GPU's samples are taken in event-time order; one older than the GPU's newest
  sample seen is too late to change an episode and is ignored. What a GPU's episodes decide
  depends on its own samples and the jobs' ends only, so a replay fires the same alerts at
  the same event times as the live stream, whatever the batching.
- **A GPU that stops reporting** keeps its episodes open, except those of a job that has
  ended: they resolve at the job's end when the worker says the GPU went silent (`expire`,
  after a minute of wall time without its samples). Event time cannot tell a silent GPU
  from one whose history is being backfilled while the rest of the fleet is live.
- **Thresholds** come from the most specific rule matching the job's team and job type
  (both, then team, then job type, then the defaults), fixed when the episode starts.
- **Restart.** A restarted worker replays each GPU's stored facts of the last
  `horizon_s()` (longer than any episode that has not fired yet) and reopens fired episodes
  from their latest stored alert row (`restore`). When that row is older than the horizon
  (updates are off, or the GPU stopped reporting), the idle time in between is read from
  the store as a sum; a busy spell running across the horizon's start then counts from there.
- **Late metadata.** A job change that re-attributes samples already seen (a job start that
  arrives after its first samples, an end that arrives late) marks their GPUs `stale`, and so
  does every correction the worker writes (a restarted worker redoes the corrections it owed
  after it rebuilt its episodes); once the worker has restated those facts, the GPU is
  rebuilt the same way from the store
  (`rebuild`), and the alerts the corrected facts make are emitted then, at the event times
  they belong to. Rows already emitted are not repeated, nor taken back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpuledger.ledger.idle_rules import IdlePolicy, IdleRule
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import Alert, AlertKind, AlertState, CostFact

# Sums of float durations are compared with this slack, so 600 one-second samples reach 600.
_EPS = 1e-9

AlertKey = tuple[str, str, str, str, str, str]
"""(kind, rule, gpu_uuid, job_id, team, project): one alert's identity across its rows."""


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One alert row as a detector decided it, and how to deliver it."""

    alert: Alert
    notify: bool = True
    """A change of state (fired, resolved) that receivers are told; False: an update."""
    fired_at: float = 0.0
    """When the alert first fired (Alertmanager's startsAt)."""

    @property
    def rule(self) -> str:
        """Which rule of its scope raised it (budget alerts: `mtd_80`, ...); '' for idle ones."""
        return self.alert.rule

    @property
    def key(self) -> AlertKey:
        a = self.alert
        return (a.kind.value, self.rule, a.gpu_uuid, a.job_id, a.team, a.project)

    @property
    def identity(self) -> tuple[Any, ...]:
        """What makes two rows the same row: the key, the state and the time in ms."""
        return (*self.key, self.alert.state.value, to_ms(self.alert.ts))


ALERT_OWNER = ("gpu_uuid", "node", "job_id", "team", "project")
"""Whom an alert is about: the GPU, its node, the job, its team and project (the fields an
alert shares with an idle episode, an orphan, a fact)."""


def owner_fields(source: Any) -> dict[str, Any]:
    """The `ALERT_OWNER` fields of an alert, an idle episode, an orphan or a fact, by name."""
    return {name: getattr(source, name) for name in ALERT_OWNER}


@dataclass(frozen=True, slots=True)
class StoredFact:
    """The part of a stored fact that idle detection reads, as a restarted worker reads it back."""

    ts: float
    gpu_uuid: str
    node: str
    job_id: str
    team: str
    project: str
    job_type: str
    duration_s: float
    util_sm: float | None
    idle_cost_usd: float
    allocated: int
    sm_active: float | None


FactLike = CostFact | StoredFact
"""What idle detection reads: a fact as the worker makes it, or as the store gives it back."""


# --- episodes ---------------------------------------------------------------------------


@dataclass(slots=True)
class Episode:
    gpu_uuid: str
    job_id: str
    node: str
    team: str
    project: str
    rule: IdleRule
    since: float
    idle_seconds: float = 0.0
    wasted_usd: float = 0.0
    counted_until: float = -math.inf
    """End of the last sample this episode took into account."""
    busy_since: float | None = None
    busy_seconds: float = 0.0
    fired_at: float | None = None
    last_alert: float = -math.inf
    """ts of its latest firing row (the firing itself or an update)."""


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def _alert(ep: Episode, ts: float, state: AlertState, reason: str = "") -> Alert:
    owner = "/".join(p for p in (ep.team, ep.project) if p) or "no team"
    if state is AlertState.firing:
        message = (
            f"GPU {ep.gpu_uuid} on {ep.node} idle for {_minutes(ep.idle_seconds)} while "
            f"allocated to job {ep.job_id} ({owner}): ${ep.wasted_usd:,.2f} wasted so far"
        )
    else:
        message = (
            f"GPU {ep.gpu_uuid} on {ep.node} no longer idle for job {ep.job_id} ({owner}): "
            f"{reason} after {_minutes(ep.idle_seconds)} idle, ${ep.wasted_usd:,.2f} wasted"
        )
    return Alert(
        ts=ts,
        kind=AlertKind.idle_allocated_gpu,
        state=state,
        **owner_fields(ep),
        since=ep.since,
        idle_seconds=ep.idle_seconds,
        wasted_usd=max(ep.wasted_usd, 0.0),
        message=message,
    )


class IdleTracker:
    """Open episodes per (GPU, job); feed it facts and job changes, it returns alert rows.

    It also remembers what it emitted (the latest row of each (GPU, job), and the rows of
    the last `horizon_s()`), so that it can rebuild a GPU from the store's facts after they
    were corrected (`rebuild`) without repeating an alert.
    """

    def __init__(self, policy: IdlePolicy | None = None) -> None:
        self.policy = policy or IdlePolicy()
        self.episodes: dict[tuple[str, str], Episode] = {}
        self.job_ends: dict[str, float] = {}
        self.watermark = -math.inf
        """The latest sample end seen, on any GPU."""
        self.stale: set[str] = set()
        """GPUs whose seen facts a job change re-attributes: rebuild them once corrected."""
        self.job_types: dict[str, str] = {}
        self._job_spans: dict[str, tuple[float | None, float, frozenset[str]]] = {}
        self._jobs_on_gpu: dict[str, set[str]] = {}
        self._gpu_last_ts: dict[str, float] = {}
        self._gpu_end: dict[str, float] = {}
        self._skip_until: dict[tuple[str, str], float] = {}
        self._latest: dict[tuple[str, str], AlertEvent] = {}
        self._emitted: dict[str, dict[tuple[Any, ...], float]] = {}
        self._observed = 0
        # A sample at or above every rule's threshold is busy for any job.
        self.max_threshold = max(
            r.idle_threshold for r in (self.policy.default, *self.policy.rules)
        )

    # -- input -------------------------------------------------------------------------
    def observe(self, facts: Iterable[FactLike]) -> list[AlertEvent]:
        """Take stored facts (several per sample: one per job); returns the alerts they make.

        A sample's facts come together, and each GPU's samples in time order (as the worker
        stores them): a sample older than its GPU's newest is taken as late and ignored."""
        rows = facts if isinstance(facts, list) else list(facts)
        out: list[AlertEvent] = []
        gpu_last, gpu_end, open_jobs = self._gpu_last_ts, self._gpu_end, self._jobs_on_gpu
        max_threshold = self.max_threshold
        i, n = 0, len(rows)
        while i < n:
            first = rows[i]
            gpu, ts = first.gpu_uuid, first.ts
            j = i + 1
            while j < n and rows[j].ts == ts and rows[j].gpu_uuid == gpu:
                j += 1
            last = gpu_last.get(gpu)
            if last is None or ts > last:  # else late or repeated: history is not rewritten
                gpu_last[gpu] = ts
                end = ts + first.duration_s
                gpu_end[gpu] = end
                if end > self.watermark:
                    self.watermark = end
                util, sm = first.util_sm, first.sm_active
                low = util if sm is None else (sm if util is None else min(util, sm))
                # The common case, inline: nothing open on the GPU and nothing idle in it.
                if gpu in open_jobs or (low is not None and low < max_threshold):
                    self._sample(rows[i:j], out)
            i = j
        self._observed += 1
        if self._observed % 500 == 0:
            self._prune()
        return out

    def job_changed(
        self,
        job_id: str,
        end: float,
        *,
        start: float | None = None,
        gpus: Iterable[str] = (),
        job_type: str = "",
    ) -> list[AlertEvent]:
        """A job's record changed: its end (`JobRecord.end()`, +inf while it runs), start,
        GPUs and type. GPUs whose already seen samples it re-attributes become `stale`."""
        self.job_types[job_id] = job_type
        span = (start, end, frozenset(gpus))
        old = self._job_spans.get(job_id)
        self._job_spans[job_id] = span
        changed_from = _changed_from(old, span)
        touched = set(span[2]) | (old[2] if old else set())
        touched |= {gpu for gpu, job in self.episodes if job == job_id}
        for gpu in touched:
            if self._gpu_end.get(gpu, -math.inf) > changed_from:
                self.stale.add(gpu)

        if math.isinf(end):
            self.job_ends.pop(job_id, None)
            return []
        self.job_ends[job_id] = end
        out: list[AlertEvent] = []
        for key, ep in list(self.episodes.items()):
            # Samples up to the end are in: nothing more will come for this job here.
            if key[1] == job_id and self._gpu_end.get(key[0], -math.inf) >= end:
                self._close(ep, max(end, ep.last_alert), "job ended", out)
        return out

    def expire(self, silent_gpus: Iterable[str]) -> list[AlertEvent]:
        """These GPUs stopped reporting: end their episodes whose job has ended, at its end."""
        out: list[AlertEvent] = []
        chosen = set(silent_gpus)
        for (gpu, job_id), ep in list(self.episodes.items()):
            end = self.job_ends.get(job_id, math.inf)
            if gpu in chosen and math.isfinite(end):
                self._close(ep, max(end, ep.last_alert), "job ended", out)
        return out

    def gpu_end(self, gpu_uuid: str) -> float:
        """The end of the GPU's newest sample seen (-inf: none)."""
        return self._gpu_end.get(gpu_uuid, -math.inf)

    def gpus_with_ended_jobs(self) -> set[str]:
        """GPUs with an open episode of a job that has ended (waiting for a sample past it)."""
        return {gpu for gpu, job_id in self.episodes if job_id in self.job_ends}

    # -- what is firing ------------------------------------------------------------------
    def firing(self) -> list[AlertEvent]:
        """Every fired, open episode as it stands now (for receivers that need re-sending)."""
        return [
            AlertEvent(
                _alert(ep, max(ep.counted_until, ep.last_alert), AlertState.firing),
                notify=False,
                fired_at=ep.fired_at,
            )
            for ep in self.episodes.values()
            if ep.fired_at is not None
        ]

    # -- rebuilding ----------------------------------------------------------------------
    def restore(
        self,
        *,
        latest: Iterable[AlertEvent],
        gaps: Mapping[tuple[str, str], IdleGap],
        tail: Iterable[FactLike],
        recorded: set[tuple[Any, ...]],
    ) -> list[AlertEvent]:
        """Rebuild episodes from stored state; returns the alerts owed.

        `latest`: the latest alert row of each (GPU, job) that is firing or recent (with its
        episode's `fired_at`); `gaps`: idle time of firing episodes between their latest
        row and the tail; `tail`: the stored facts of each GPU's last `policy.horizon_s()`,
        replayed in order; `recorded`: identities of the alert rows already emitted since
        the tail's start. Alerts the replay makes that are not recorded (a crash after the
        facts were stored, before their alert was) are returned, to be delivered.
        """
        for event in latest:
            alert = event.alert
            pair = (alert.gpu_uuid, alert.job_id)
            self._latest[pair] = event
            if alert.state is AlertState.firing:
                self._resume(event)
                gap = gaps.get(pair)
                if gap is not None:
                    ep = self.episodes[pair]
                    ep.idle_seconds += gap.idle_seconds
                    ep.wasted_usd += gap.wasted_usd
                    ep.counted_until = max(ep.counted_until, gap.until)
            else:
                self._skip_until[pair] = alert.ts
        return [e for e in self.observe(tail) if e.identity not in recorded]

    def rebuild(
        self,
        gpus: Iterable[str],
        *,
        tail: Iterable[FactLike],
        gaps: Mapping[tuple[str, str], IdleGap],
    ) -> list[AlertEvent]:
        """Start these GPUs over from their stored (corrected) facts: `tail` holds each one's
        last `policy.horizon_s()`. What was already emitted is not emitted again."""
        chosen = set(gpus)
        latest = [e for pair, e in self._latest.items() if pair[0] in chosen]
        recorded = {i for gpu in chosen for i in self._emitted.get(gpu, {})}
        for pair in [p for p in self.episodes if p[0] in chosen]:
            ep = self.episodes.pop(pair)
            self._jobs_on_gpu.get(ep.gpu_uuid, set()).discard(ep.job_id)
        for table in (self._gpu_last_ts, self._gpu_end, self._jobs_on_gpu):
            for gpu in chosen:
                table.pop(gpu, None)
        for pair in [p for p in self._skip_until if p[0] in chosen]:
            del self._skip_until[pair]
        self.stale -= chosen
        return self.restore(latest=latest, gaps=gaps, tail=tail, recorded=recorded)

    def latest_of(self, gpus: Iterable[str]) -> list[AlertEvent]:
        """The latest row emitted for each (GPU, job) of these GPUs."""
        chosen = set(gpus)
        return [e for pair, e in self._latest.items() if pair[0] in chosen]

    def _resume(self, event: AlertEvent) -> None:
        alert = event.alert
        rule = self.policy.rule_for(alert.team, self.job_types.get(alert.job_id, ""))
        ep = Episode(
            **owner_fields(alert),
            rule=rule,
            since=alert.since,
            idle_seconds=alert.idle_seconds,
            wasted_usd=alert.wasted_usd,
            counted_until=alert.ts,
            fired_at=event.fired_at or alert.ts,
            last_alert=alert.ts,
        )
        self._open(ep)

    # -- the state machine ---------------------------------------------------------------
    def _open(self, ep: Episode) -> None:
        self.episodes[(ep.gpu_uuid, ep.job_id)] = ep
        self._jobs_on_gpu.setdefault(ep.gpu_uuid, set()).add(ep.job_id)

    def _emit(self, event: AlertEvent, out: list[AlertEvent]) -> None:
        alert = event.alert
        self._latest[(alert.gpu_uuid, alert.job_id)] = event
        self._emitted.setdefault(alert.gpu_uuid, {})[event.identity] = alert.ts
        out.append(event)

    def _sample(self, group: Sequence[FactLike], out: list[AlertEvent]) -> None:
        """One sample's facts (already taken as the GPU's newest) that may change episodes."""
        first = group[0]
        gpu, ts = first.gpu_uuid, first.ts
        held = {f.job_id: f for f in group if f.allocated and f.job_id}
        for job_id in list(self._jobs_on_gpu.get(gpu, ())):
            ep = self.episodes[(gpu, job_id)]
            # A sample from before what the episode counted (a replayed tail) says nothing.
            if job_id not in held and ts >= ep.counted_until:
                job_end = self.job_ends.get(job_id, math.inf)
                if job_end <= ts:
                    self._close(ep, max(job_end, ep.last_alert), "job ended", out)
                else:
                    self._close(ep, max(ts, ep.last_alert), "job no longer holds the GPU", out)
        for fact in held.values():
            self._step(fact, out)

    def _step(self, fact: FactLike, out: list[AlertEvent]) -> None:
        key = (fact.gpu_uuid, fact.job_id)
        if fact.ts < self._skip_until.get(key, -math.inf):
            return
        ep = self.episodes.get(key)
        if ep is not None and fact.ts < ep.counted_until:
            return
        rule = ep.rule if ep is not None else self.policy.rule_for(fact.team, fact.job_type)
        util = rule.basis.judge(fact.util_sm, fact.sm_active)
        if util is None:
            return
        end = fact.ts + fact.duration_s
        if util < rule.idle_threshold:
            if ep is None:
                ep = Episode(**owner_fields(fact), rule=rule, since=fact.ts)
                self._open(ep)
            ep.idle_seconds += fact.duration_s
            ep.wasted_usd += fact.idle_cost_usd
            ep.busy_since = None
            ep.busy_seconds = 0.0
            ep.counted_until = end
            if ep.fired_at is None:
                if ep.idle_seconds >= rule.alert_after_s - _EPS:
                    ep.fired_at = ep.last_alert = end
                    self._emit(AlertEvent(_alert(ep, end, AlertState.firing), fired_at=end), out)
            elif (
                self.policy.update_every_s > 0
                and end - ep.last_alert >= self.policy.update_every_s - _EPS
            ):
                ep.last_alert = end
                update = _alert(ep, end, AlertState.firing)
                self._emit(AlertEvent(update, notify=False, fired_at=ep.fired_at), out)
            return
        if ep is None:
            return
        if ep.fired_at is None:
            self._close(ep, fact.ts, "busy again", out)  # a break before firing: no alert
            return
        ep.counted_until = end
        if ep.busy_since is None:
            ep.busy_since = fact.ts
        ep.busy_seconds += fact.duration_s
        if ep.busy_seconds >= rule.resolve_after_s - _EPS:
            self._close(ep, ep.busy_since, "busy again", out)

    def _close(self, ep: Episode, at: float, reason: str, out: list[AlertEvent]) -> None:
        del self.episodes[(ep.gpu_uuid, ep.job_id)]
        jobs = self._jobs_on_gpu.get(ep.gpu_uuid)
        if jobs is not None:
            jobs.discard(ep.job_id)
            if not jobs:
                del self._jobs_on_gpu[ep.gpu_uuid]
        if ep.fired_at is not None:
            resolved = _alert(ep, at, AlertState.resolved, reason)
            self._emit(AlertEvent(resolved, fired_at=ep.fired_at), out)

    def _prune(self) -> None:
        """Forget emitted rows older than a horizon (the memory of a long-running worker)."""
        horizon = self.policy.horizon_s()
        for gpu, ids in self._emitted.items():
            cutoff = self._gpu_end.get(gpu, self.watermark) - horizon
            for identity in [i for i, ts in ids.items() if ts < cutoff]:
                del ids[identity]
        for pair, event in list(self._latest.items()):
            cutoff = self._gpu_end.get(pair[0], self.watermark) - horizon
            if event.alert.state is AlertState.resolved and event.alert.ts < cutoff:
                del self._latest[pair]


def _changed_from(
    old: tuple[float | None, float, frozenset[str]] | None,
    new: tuple[float | None, float, frozenset[str]],
) -> float:
    """The earliest event time whose allocation a job change alters (+inf: none)."""
    start, end, gpus = new
    if old is None:
        return start if start is not None else math.inf
    old_start, old_end, old_gpus = old
    moments = []
    if old_gpus != gpus:
        moments += [t for t in (old_start, start) if t is not None]
    if old_start != start:
        moments += [t for t in (old_start, start) if t is not None]
    if old_end != end:
        moments.append(min(old_end, end))
    return min(moments, default=math.inf)


# --- a restart --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdleGap:
    """Idle time of a resumed episode between its latest firing row and the replayed tail."""

    idle_seconds: float
    wasted_usd: float
    until: float
