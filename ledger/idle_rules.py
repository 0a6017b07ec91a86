"""Idle thresholds per team and job type (ARCHITECTURE.md §3.5-3.6): the rules file and the
policy that picks the most specific rule for a job.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gpuledger.schema.messages import IdleBasis


@dataclass(frozen=True, slots=True)
class IdleRule:
    idle_threshold: float = 0.05
    alert_after_s: float = 600.0
    resolve_after_s: float = 60.0
    team: str | None = None
    job_type: str | None = None
    basis: IdleBasis = IdleBasis.busy_time  # which utilization the threshold applies to

    def specificity(self) -> int:
        return (2 if self.team is not None else 0) + (1 if self.job_type is not None else 0)


@dataclass(frozen=True)
class IdlePolicy:
    default: IdleRule = IdleRule()
    rules: tuple[IdleRule, ...] = ()
    update_every_s: float = 60.0
    _cache: dict[tuple[str, str], IdleRule] = field(default_factory=dict, compare=False, repr=False)

    def rule_for(self, team: str, job_type: str) -> IdleRule:
        """The most specific rule for a job (first in the file among equals)."""
        found = self._cache.get((team, job_type))
        if found is not None:
            return found
        best = self.default
        for rule in self.rules:
            matches = (rule.team is None or rule.team == team) and (
                rule.job_type is None or rule.job_type == job_type
            )
            if matches and rule.specificity() > best.specificity():
                best = rule
        self._cache[(team, job_type)] = best
        return best

    def horizon_s(self) -> float:
        """How much recent event time a restarted worker re-reads to rebuild its episodes."""
        rules = (self.default, *self.rules)
        longest = max(r.alert_after_s + r.resolve_after_s for r in rules)
        return longest + self.update_every_s + 300.0


class IdleRulesError(ValueError):
    """The idle rules file is not valid; the message names the rule, the field and the value."""


_RULE_FIELDS = {
    "team",
    "job_type",
    "idle_threshold",
    "idle_alert_after_s",
    "idle_resolve_after_s",
    "utilization",
}
_BASES = {basis.value: basis for basis in IdleBasis}


def parse_idle_rules(text: str, default: IdleRule, source: str = "idle rules") -> list[IdleRule]:
    """Rules from TOML: `[[rule]]` tables with `team` and/or `job_type` and the thresholds
    (`idle_threshold`, `idle_alert_after_s`, `idle_resolve_after_s`) they change, and the
    `utilization` the threshold applies to (`busy_time` or `sm_active`)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise IdleRulesError(f"{source}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"rule"}
    if unknown:
        raise IdleRulesError(
            f"{source}: unknown table(s) {sorted(unknown)}; write each rule as [[rule]]"
        )
    rules: list[IdleRule] = []
    for number, raw in enumerate(data.get("rule", []), start=1):
        where = f"{source} rule {number}"
        extra = set(raw) - _RULE_FIELDS
        if extra:
            raise IdleRulesError(
                f"{where}: unknown field(s) {sorted(extra)}; known: {sorted(_RULE_FIELDS)}"
            )
        if "team" not in raw and "job_type" not in raw:
            raise IdleRulesError(f"{where}: give a team, a job_type or both to say whom it is for")
        for name in ("team", "job_type"):
            if name in raw and not isinstance(raw[name], str):
                raise IdleRulesError(f"{where}: {name} must be a string, got {raw[name]!r}")
        values = {}
        for name, attr, low, high in (
            ("idle_threshold", "idle_threshold", 0.0, 1.0),
            ("idle_alert_after_s", "alert_after_s", 1e-9, math.inf),
            ("idle_resolve_after_s", "resolve_after_s", 1e-9, math.inf),
        ):
            if name not in raw:
                continue
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise IdleRulesError(f"{where}: {name} must be a number, got {value!r}")
            if not low <= value <= high:
                bound = "in 0..1" if high == 1.0 else "> 0"
                raise IdleRulesError(f"{where}: {name} must be {bound}, got {value!r}")
            values[attr] = float(value)
        basis = raw.get("utilization", default.basis.value)
        if basis not in _BASES:
            raise IdleRulesError(
                f"{where}: utilization must be one of {sorted(_BASES)}, got {basis!r}"
            )
        rules.append(
            IdleRule(
                idle_threshold=values.get("idle_threshold", default.idle_threshold),
                alert_after_s=values.get("alert_after_s", default.alert_after_s),
                resolve_after_s=values.get("resolve_after_s", default.resolve_after_s),
                team=raw.get("team"),
                job_type=raw.get("job_type"),
                basis=_BASES[basis],
            )
        )
    return rules


def load_idle_policy(
    default: IdleRule, rules_file: Path | None, update_every_s: float
) -> IdlePolicy:
    rules: list[IdleRule] = []
    if rules_file is not None:
        try:
            text = rules_file.read_text()
        except OSError as exc:
            raise IdleRulesError(
                f"idle rules file {rules_file}: cannot read it ({exc}); "
                "fix GPULEDGER_IDLE_RULES_FILE"
            ) from exc
        rules = parse_idle_rules(text, default, str(rules_file))
    return IdlePolicy(default=default, rules=tuple(rules), update_every_s=update_every_s)
