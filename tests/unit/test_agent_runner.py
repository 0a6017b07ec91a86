"""`generate`: the simulated agent's output over a time range, fast and deterministic."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import BaseModel

from gpuledger.agents.config import AgentConfig
from gpuledger.agents.publisher import encode
from gpuledger.agents.runner import DEMO_SCENARIO, AgentError, generate, run_agent
from gpuledger.agents.sim.engine import Scenario
from gpuledger.schema.messages import GpuSample, JobEvent, NodeInfo, SampleBatch, UsageEvent

T0 = 1_700_000_000.0
MODELS: dict[str, type[BaseModel]] = {
    "samples": SampleBatch,
    "jobs": JobEvent,
    "nodes": NodeInfo,
    "usage": UsageEvent,
}


def demo() -> Scenario:
    return Scenario.load(DEMO_SCENARIO, origin=T0)


def test_ten_minutes_of_the_demo_fleet_validate_as_the_contract_says() -> None:
    records = list(generate(demo(), T0, T0 + 600))
    topics = Counter(topic for topic, _, _ in records)
    assert topics["samples"] == 600 * 3  # one batch per node and second
    assert topics["nodes"] == 3 and topics["jobs"] > 0 and topics["usage"] > 0
    for topic, key, message in records:
        # what goes on the wire parses back with the topic's model
        parsed = MODELS[topic].model_validate_json(encode(message))
        if isinstance(parsed, SampleBatch):
            assert key == parsed.node
            samples = [GpuSample.model_validate(s) for s in parsed.samples]
            assert all(s.node == key and s.interval_s == 1.0 for s in samples)
            assert len({s.ts for s in samples}) == 1
        elif isinstance(parsed, (JobEvent, UsageEvent)):
            assert key == parsed.job_id
        else:
            assert isinstance(parsed, NodeInfo) and key == parsed.node


def test_generate_gives_the_same_bytes_every_time() -> None:
    first = [(t, k, encode(m)) for t, k, m in generate(demo(), T0, T0 + 120)]
    second = [(t, k, encode(m)) for t, k, m in generate(demo(), T0, T0 + 120)]
    assert first == second


def test_samples_tile_time_and_events_come_before_the_samples_they_describe() -> None:
    records = list(generate(demo(), T0, T0 + 300, nodes=["aws-p5-01"]))
    batches = [m for t, _, m in records if isinstance(m, SampleBatch)]
    assert [b.samples[0]["ts"] for b in batches] == [T0 + k for k in range(300)]
    assert {b.node for b in batches} == {"aws-p5-01"}
    # the idle notebook starts at +30: its job event precedes the batch covering [30, 31)
    position = {id(m): i for i, (_, _, m) in enumerate(records)}  # order in the stream
    start = next(
        m for _, k, m in records if isinstance(m, JobEvent) and k.startswith("notebook-alice")
    )
    covering = next(b for b in batches if b.samples[0]["ts"] == T0 + 30)
    assert position[id(start)] < position[id(covering)]
    # only this node's jobs and description
    assert all(
        not isinstance(m, NodeInfo) or m.node == "aws-p5-01" for _, _, m in records
    ) and not any(isinstance(m, UsageEvent) for _, _, m in records)


def test_a_replay_started_later_continues_the_same_history() -> None:
    whole = [(t, k, encode(m)) for t, k, m in generate(demo(), T0, T0 + 40)]
    tail = [(t, k, encode(m)) for t, k, m in generate(demo(), T0 + 20, T0 + 40)]
    assert whole[-len(tail) :] == tail


def test_unknown_node_and_missing_nvml_stop_the_agent_with_what_to_do() -> None:
    with pytest.raises(AgentError, match="its nodes are aws-p5-01, gcp-g2-01, lambda-a100-01"):
        list(generate(demo(), T0, T0 + 1, nodes=["gpu-box-9"]))
    with pytest.raises(AgentError, match=r"libnvidia-ml\.so\.1.*--simulate agents/scenarios/demo"):
        run_agent(AgentConfig("127.0.0.1:9", duration_s=1))
    with pytest.raises(AgentError, match="add --simulate"):
        run_agent(AgentConfig("127.0.0.1:9", speed=10))
