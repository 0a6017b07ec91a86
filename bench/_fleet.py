"""A realistic fleet for the benchmarks, as the node agents would publish it.

Six template nodes of eight GPUs (training runs announced by the scheduler, inference known
by process labels, two jobs sharing GPUs, an idle notebook, unallocated GPUs, spot and
reserved nodes, a negotiated rate) are simulated by the agent's own scenario engine
(`gpuledger.agents.runner.AgentCore`, the code that `gpuledger agent --simulate` runs). Simulating
NVML costs about 150 µs a sample, too slow for a 10,000-GPU fleet, so each template's records
are then cloned: node names, GPU UUIDs and job ids are rewritten per clone in the JSON, and
everything else (values, shapes, sizes) is what the agent sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from gpuledger.agents.publisher import encode
from gpuledger.agents.runner import AgentCore
from gpuledger.agents.sim.engine import Scenario

GPUS_PER_NODE = 8
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: event time of the generated history

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
L40S = "NVIDIA L40S"


def _node(name: str, provider: str, region: str, pricing: str, gpu: str, **extra: Any) -> dict:
    return {
        "name": name,
        "provider": provider,
        "region": region,
        "pricing_model": pricing,
        "gpus": [{"name": gpu, "count": GPUS_PER_NODE}],
        **extra,
    }


def _job(job_id: str, node: str, gpus: list[int], **extra: Any) -> dict:
    return {"job_id": f"{job_id}-{{cycle}}-{node}", "node": node, "gpus": gpus, **extra}


def scenario_dict() -> dict[str, Any]:
    """The template fleet: node names `tplN`, which clones rewrite."""
    nodes = [
        _node("tpl0", "aws", "us-east-1", "on_demand", H100),
        _node("tpl1", "aws", "us-east-1", "spot", H100),
        _node("tpl2", "gcp", "us-central1", "on_demand", A100),
        _node("tpl3", "lambda", "us-east-1", "reserved", H100, usd_per_gpu_hour=2.49),
        _node("tpl4", "aws", "us-east-1", "on_demand", L40S),
        _node("tpl5", "gcp", "us-central1", "spot", A100),
    ]
    research = {"team": "research", "project": "llm-pretrain", "job_type": "training"}
    applied = {"team": "applied", "project": "support-bot", "job_type": "training"}
    product = {"team": "product", "project": "assistant", "job_type": "inference"}
    jobs = [
        _job("pretrain", "tpl0", list(range(8)), **research, start_s=0, end_s=3000,
             repeat_every_s=3600, profile="busy", mem_gb=71),
        _job("finetune-a", "tpl1", [0, 1, 2, 3], **applied, start_s=0, end_s=1700,
             repeat_every_s=1800, profile="busy", util=0.8, mem_gb=60),
        _job("finetune-b", "tpl1", [4, 5, 6, 7], **applied, start_s=300, end_s=1500,
             repeat_every_s=1800, profile="busy", util=0.7, mem_gb=50),
        _job("chat", "tpl2", [0, 1], **product, announce="labels", profile="bursty",
             requests_per_s=12.0, tokens_per_request=400.0, mem_gb=30),
        _job("sweep", "tpl2", [2, 3, 4, 5], team="research", project="llm-eval",
             job_type="tuning", start_s=0, end_s=800, repeat_every_s=900, profile="busy",
             util=0.75, mem_gb=40, final_state="failed"),
        _job("notebook", "tpl2", [6], team="applied", project="churn-model",
             job_type="notebook", start_s=0, end_s=2400, repeat_every_s=3600,
             profile="idle", mem_gb=12, final_state="cancelled"),
        _job("pretrain", "tpl3", list(range(8)), **research, start_s=0, end_s=5000,
             repeat_every_s=5400, profile="busy", mem_gb=75),
        _job("embed", "tpl4", [0, 1, 2, 3], team="search", project="semantic-index",
             job_type="data_processing", announce="labels", job_events=True,
             profile="shared", mem_gb=9),
        _job("rerank", "tpl4", [0, 1, 2, 3], team="search", project="semantic-index",
             job_type="inference", announce="labels", profile="shared", mem_gb=7),
        _job("etl", "tpl4", [4, 5], team="data", project="warehouse",
             job_type="data_processing", start_s=0, end_s=600, repeat_every_s=900,
             profile="busy", util=0.6, mem_gb=14, final_state="failed"),
        _job("serve", "tpl5", [0, 1, 2, 3, 4, 5], **product, profile="bursty", util=0.45,
             mem_gb=35),
    ]  # fmt: skip
    return {
        "scenario": {"name": "bench-fleet", "seed": 11, "node_info_every_s": 0},
        "nodes": nodes,
        "jobs": jobs,
    }


@dataclass
class Tick:
    """What the whole fleet publishes at one tick: (topic, key, JSON bytes)."""

    now: float
    events: list[tuple[str, bytes, bytes]]
    batches: list[tuple[bytes, bytes]]  # (node key, SampleBatch JSON)


class Fleet:
    """`nodes` nodes of eight GPUs, cloned from the templates."""

    def __init__(self, nodes: int, t0: float = T0, interval_s: float = 1.0) -> None:
        self.nodes = nodes
        self.t0 = t0
        self.interval_s = interval_s
        self.scenario = Scenario.from_dict(scenario_dict(), origin=t0, source="bench fleet")
        self.templates = self.scenario.node_names
        self._core = AgentCore.simulated(self.scenario, interval_s=interval_s)
        self._previous = t0
        self._k = 0
        self._uuids: dict[str, set[str]] = {name: set() for name in self.templates}
        self._rewriters: dict[int, tuple[int, re.Pattern[bytes], dict[bytes, bytes]]] = {}

    @property
    def gpus(self) -> int:
        return self.nodes * GPUS_PER_NODE

    def clone_name(self, clone: int) -> str:
        return f"node{clone:05d}"

    def _rewriter(self, template: str, clone: int) -> tuple[re.Pattern[bytes], dict[bytes, bytes]]:
        name = self.clone_name(clone).encode()
        mapping = {template.encode(): name}
        for uuid in self._uuids[template]:
            head, _, rest = uuid.partition("-")
            # GPU-xxxxxxxx-... -> GPU-<clone>-...: unique per clone, same shape as NVML's.
            mapping[uuid.encode()] = f"{head}-{clone:08x}-{rest.partition('-')[2]}".encode()
        longest_first = sorted(mapping, key=len, reverse=True)
        pattern = re.compile(b"|".join(re.escape(k) for k in longest_first))
        return pattern, mapping

    def ticks(self, count: int) -> Iterator[Tick]:
        """The next `count` ticks of the whole fleet."""
        for _ in range(count):
            self._k += 1
            now = self.t0 + self._k * self.interval_s
            records, _stats = self._core.step(self._previous, now)
            self._previous = now
            by_template: dict[str, list[tuple[str, bytes]]] = {n: [] for n in self.templates}
            for topic, _key, message in records:
                payload = encode(message)
                owner = _owner(payload, self.templates)
                if topic == "samples":
                    for sample in orjson.loads(payload)["samples"]:
                        self._uuids[owner].add(sample["gpu_uuid"])
                by_template[owner].append((topic, payload))
            tick = Tick(now, [], [])
            for clone in range(self.nodes):
                template = self.templates[clone % len(self.templates)]
                known = len(self._uuids[template])
                cached = self._rewriters.get(clone)
                if cached is None or cached[0] != known:
                    cached = (known, *self._rewriter(template, clone))
                    self._rewriters[clone] = cached
                _, pattern, mapping = cached
                replace = _replacer(mapping)
                for topic, payload in by_template[template]:
                    out = pattern.sub(replace, payload)
                    key = _key_of(topic, out)
                    if topic == "samples":
                        tick.batches.append((key, out))
                    else:
                        tick.events.append((topic, key, out))
            yield tick


def _replacer(mapping: dict[bytes, bytes]) -> Callable[[re.Match[bytes]], bytes]:
    def replace(match: re.Match[bytes]) -> bytes:
        return mapping[match.group(0)]

    return replace


def _owner(payload: bytes, templates: list[str]) -> str:
    for name in templates:
        if f'"{name}"'.encode() in payload or f"-{name}".encode() in payload:
            return name
    raise ValueError(f"record names no template node: {payload[:200]!r}")


def _key_of(topic: str, payload: bytes) -> bytes:
    value = orjson.loads(payload)
    if topic == "samples" or topic == "nodes":
        return str(value["node"]).encode()
    return str(value["job_id"]).encode()
