"""What the worker knows besides samples: jobs, prices, nodes. In memory, no I/O.

Each change says which stored facts it may alter (a list of `Scope`s), so that the worker
can cancel and restate them (DESIGN.md §4). A change that alters nothing returns an empty
list: a replayed topic or a state rebuilt from the store corrects nothing.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace

from schema.messages import CostFact, GpuSample, JobEvent, NodeInfo, PriceEntry
from schema.pricebook import GpuModelCatalog
from streams.cost import JobRecord, PriceIndex, allocate, cost_sample, merge_job
from streams.restate import Scope


class MetadataState:
    def __init__(self, catalog: GpuModelCatalog, idle_threshold: float = 0.05) -> None:
        self.catalog = catalog
        self.idle_threshold = idle_threshold
        self.jobs: dict[str, JobRecord] = {}
        self.jobs_by_gpu: dict[str, set[str]] = defaultdict(set)
        self.prices = PriceIndex([])
        self._price_keys: dict[str, PriceEntry] = {}
        # per node, its NodeInfo history sorted by ts: each governs samples from its ts on;
        # the first also governs the samples before it (a node announced late).
        self._nodes: dict[str, list[NodeInfo]] = {}

    # -- jobs ------------------------------------------------------------------------
    def apply_job(self, event: JobEvent) -> list[Scope]:
        old = self.jobs.get(event.job_id)
        new = merge_job(old, event)
        self.jobs[new.job_id] = new
        if old is not None and replace(new, ts=0.0) == replace(old, ts=0.0):
            return []  # a repeat of what we knew: nothing to correct
        for gpu in old.gpu_uuids if old else ():
            self.jobs_by_gpu[gpu].discard(new.job_id)
        for gpu in new.gpu_uuids:
            self.jobs_by_gpu[gpu].add(new.job_id)
        if old is not None and _same_but_end(old, new):
            # Only the end (or the state) moved: only samples between the two ends change
            # hands. A week-long job's finish must not re-cost its whole week.
            first, last = sorted((old.end(), new.end()))
            if first == last or not new.gpu_uuids or new.started_at is None:
                return []
            t_to = None if math.isinf(last) else last
            return [Scope(gpu_uuids=frozenset(new.gpu_uuids), t_from=first, t_to=t_to)]
        # Facts this job owned or may now own: any fact carrying its id (attributed through
        # labels, or before a change), and its GPUs from the earliest start either version
        # of it knew.
        scopes = [Scope(job_id=new.job_id)]
        gpus = frozenset((old.gpu_uuids if old else ()) + new.gpu_uuids)
        starts = [rec.started_at for rec in (old, new) if rec and rec.started_at is not None]
        if gpus and starts:
            scopes.append(Scope(gpu_uuids=gpus, t_from=min(starts)))
        return scopes

    # -- prices ----------------------------------------------------------------------
    def apply_price(self, entry: PriceEntry) -> list[Scope]:
        if self._price_keys.get(entry.key) == entry:
            return []
        self._price_keys[entry.key] = entry
        self.prices.add(entry)
        model = None if entry.gpu_model == "*" else entry.gpu_model
        return [Scope(gpu_model=model, t_from=entry.effective_from)]

    # -- nodes -----------------------------------------------------------------------
    def apply_node(self, info: NodeInfo) -> list[Scope]:
        history = self._nodes.setdefault(info.node, [])
        if info in history:
            return []
        stamps = [n.ts for n in history]
        at = bisect.bisect_right(stamps, info.ts)
        history.insert(at, info)
        t_from = None if at == 0 else info.ts
        return [Scope(node=info.node, t_from=t_from)]

    def node_at(self, node: str, ts: float) -> NodeInfo | None:
        history = self._nodes.get(node)
        if not history:
            return None
        at = bisect.bisect_right([n.ts for n in history], ts)
        return history[max(at - 1, 0)]

    # -- costing ---------------------------------------------------------------------
    def cost(self, sample: GpuSample) -> list[CostFact]:
        jobs = [self.jobs[j] for j in self.jobs_by_gpu.get(sample.gpu_uuid, ())]
        shares = allocate(sample, jobs, self.jobs)
        return cost_sample(
            sample,
            shares,
            node=self.node_at(sample.node, sample.ts),
            price_index=self.prices,
            catalog=self.catalog,
            idle_threshold=self.idle_threshold,
        )

    def cost_all(self, samples: Iterable[GpuSample]) -> list[CostFact]:
        facts: list[CostFact] = []
        for sample in samples:
            facts.extend(self.cost(sample))
        return facts


def _same_but_end(old: JobRecord, new: JobRecord) -> bool:
    """True when the two versions attribute the same way up to their ends."""
    return (
        old.gpu_uuids == new.gpu_uuids
        and old.started_at == new.started_at
        and (old.team, old.project, old.job_type, old.experiment_id)
        == (new.team, new.project, new.job_type, new.experiment_id)
    )
