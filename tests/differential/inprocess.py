"""The worker's cost path in process: `MetadataState` for metadata, `cost_all` for samples,
and cancel and restate for late metadata, over a store kept in a dict.

It does what `streams/pipeline.py` does with the store, minus the I/O: a sample seen again is
dropped; a metadata change's scopes select the stored samples (any row, cancelled or not,
matching every filter the scope sets, as `sink._scope_filter` selects them), which are
re-costed with what is known now, and whatever changed is cancelled and restated. Samples are
costed the moment they arrive (no grace): the most corrections a stream can need.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from gpuledger.ledger.factrows import FACT_COLUMNS, Row, fact_row
from gpuledger.ledger.restate import Scope, correction, live_rows
from gpuledger.ledger.state import MetadataState
from gpuledger.schema.messages import GpuSample, IdleBasis, JobEvent, NodeInfo, PriceEntry
from gpuledger.schema.pricebook import load_gpu_models

_COLUMNS = tuple(c for c in FACT_COLUMNS if c != "sign")
_AT = {name: i for i, name in enumerate(_COLUMNS)}


def in_scope(scope: Scope, row: Row) -> bool:
    checks: list[tuple[str, Any]] = [
        ("job_id", scope.job_id),
        ("node", scope.node),
        ("gpu_model", scope.gpu_model),
        ("provider", scope.provider),
        ("region", scope.region),
        ("pricing_model", scope.pricing_model),
    ]
    if any(value is not None and row[_AT[name]] != value for name, value in checks):
        return False
    if scope.gpu_uuids is not None and row[_AT["gpu_uuid"]] not in scope.gpu_uuids:
        return False
    ts = row[_AT["ts"]]
    assert isinstance(ts, int)
    if scope.t_from is not None and ts < round(scope.t_from * 1000):
        return False
    return scope.t_to is None or ts < round(scope.t_to * 1000)


class InProcessWorker:
    def __init__(
        self, idle_threshold: float = 0.05, idle_basis: IdleBasis = IdleBasis.busy_time
    ) -> None:
        self.state = MetadataState(load_gpu_models(), idle_threshold, idle_basis)
        self.raw: dict[tuple[str, int], GpuSample] = {}
        self.stored: dict[tuple[str, int], list[tuple[int, Row]]] = defaultdict(list)
        self.usage: list[dict[str, Any]] = []
        self.corrections = 0

    def take(self, topic: str, value: dict[str, Any]) -> None:
        if topic == "samples":
            for item in value["samples"]:
                sample = GpuSample.model_validate(item)
                key = (sample.gpu_uuid, round(sample.ts * 1000))
                if key in self.raw:
                    continue
                self.raw[key] = sample
                self.stored[key] += [(1, fact_row(f)) for f in self.state.cost_all([sample])]
        elif topic == "jobs":
            self._correct(self.state.apply_job(JobEvent.model_validate(value)))
        elif topic == "prices":
            self._correct(self.state.apply_price(PriceEntry.model_validate(value)))
        elif topic == "nodes":
            self._correct(self.state.apply_node(NodeInfo.model_validate(value)))
        elif topic == "usage":
            self.usage.append(value)
        else:
            raise ValueError(f"no topic {topic!r}")

    def _correct(self, scopes: list[Scope]) -> None:
        keys = [
            key
            for key, history in self.stored.items()
            if any(in_scope(scope, row) for scope in scopes for _, row in history)
        ]
        for key in keys:
            history = self.stored[key]
            recosted = [fact_row(f) for f in self.state.cost_all([self.raw[key]])]
            cancels, restates = correction(live_rows(history), recosted)
            if cancels or restates:
                self.corrections += 1
            history += [(-1, row) for row in cancels] + [(1, row) for row in restates]

    def rows(self) -> list[dict[str, Any]]:
        """The live facts, as the reference's rows (ts in seconds)."""
        live: Counter[Row] = Counter()
        for history in self.stored.values():
            live.update(live_rows(history))
        out = []
        for row, count in live.items():
            values = dict(zip(_COLUMNS, row, strict=True))
            ts_ms = values["ts"]
            assert isinstance(ts_ms, int)
            values["ts"] = ts_ms / 1000
            out += [values] * count
        return out

    def jobs(self) -> dict[str, dict[str, Any]]:
        """The merged jobs as the reference describes them."""
        return {
            job_id: {
                "state": record.state.value if record.state else "",
                "team": record.team or "",
                "project": record.project or "",
                "job_type": record.job_type.value if record.job_type else "",
                "experiment_id": record.experiment_id or "",
                "model": record.model or "",
                "environment": record.environment or "",
                "started_at": record.started_at,
                "ended_at": record.ended_at,
                "gpu_uuids": tuple(sorted(record.gpu_uuids)),
            }
            for job_id, record in self.state.jobs.items()
        }
