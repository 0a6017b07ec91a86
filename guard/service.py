"""The guard's loop: every `check_every_s`, the idle episodes firing now (and, for policies
that ask, the endpoints losing money and the orphaned GPU memory) are matched against the
policies; each step that falls due is carried out (or recorded as a dry run) and written
to the audit trail, and published on the actions topic when a publisher is given.

The audit trail is the guard's only memory: what it decided is read back from the store
before each round, so a guard restarted at any point neither repeats nor skips a step. A step
is recorded after it is carried out; a guard killed in between does it again on restart,
which the actuators make harmless (they are idempotent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gpuledger.guard.actuators import Actuators
from gpuledger.guard.store import (
    acts_since,
    firing_budgets,
    losing_endpoints,
    open_episodes,
    orphan_episodes,
    record,
    row_of,
    taken_steps,
)
from gpuledger.ledger.guard import Policy, budget_rules_for, decide_all

log = logging.getLogger("gpuledger.guard")

Publish = Callable[[Sequence[dict[str, Any]]], None]


@dataclass
class Guard:
    client: Any
    policies: Sequence[Policy]
    actuators: Actuators
    kill_switch: bool = False
    publish: Publish | None = None
    clock: Callable[[], float] = time.time
    rounds: int = field(default=0, init=False)

    def check_once(self) -> list[dict[str, Any]]:
        """One round: decide, carry out, record. Returns the rows it recorded."""
        now = self.clock()
        taken = taken_steps(self.client)
        acts = acts_since(self.client, now - 3600)
        rows: list[dict[str, Any]] = []
        conditions = {p.condition for p in self.policies}
        episodes = open_episodes(self.client) if "idle" in conditions else []
        if "losing_money" in conditions:
            episodes += losing_endpoints(self.client, now)
        if "orphaned_memory" in conditions:
            episodes += orphan_episodes(self.client)
        if any(p.budget_rules for p in self.policies):
            budgets = firing_budgets(self.client)
            episodes = [
                replace(e, budget_rules=budget_rules_for(e.team, e.project, budgets))
                for e in episodes
            ]
        for episode in episodes:
            mine = taken.get(episode.target, {})
            for decision in decide_all(
                self.policies, episode, mine, now, acts_last_hour=acts, kill_switch=self.kill_switch
            ):
                outcome = self.actuators.carry_out(decision, episode)
                row = row_of(decision, episode, outcome)
                record(self.client, [row])  # one by one: a crash loses at most the step at hand
                rows.append(row)
                if decision.kind == "act" and not decision.dry_run:
                    acts[decision.policy] = acts.get(decision.policy, 0) + 1
                log.info(
                    "guard: %s %s step %d %s%s on %s: %s",
                    decision.policy,
                    decision.kind,
                    decision.step,
                    decision.action.value if decision.action else "",
                    " (dry run)" if decision.dry_run else "",
                    decision.target,
                    outcome,
                )
        if rows and self.publish is not None:
            self.publish(rows)
        self.rounds += 1
        return rows

    def run(self, check_every_s: float, stop: Callable[[], bool]) -> None:
        """Rounds until `stop()`; a round that fails (the store away) is logged and retried."""
        while not stop():
            started = time.monotonic()
            try:
                self.check_once()
            except Exception as exc:  # the store or an actuator failed: the next round retries
                log.warning("guard round failed (%s); next in %.0f s", exc, check_every_s)
            time.sleep(max(0.0, check_every_s - (time.monotonic() - started)))
