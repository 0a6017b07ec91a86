"""The agent against the real embedded Kafka broker: what a consumer downstream receives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from gpuledger.agents.config import AgentConfig
from gpuledger.agents.publisher import encode
from gpuledger.agents.runner import DEMO_SCENARIO, generate, run_agent
from gpuledger.agents.sim.engine import Scenario
from gpuledger.broker import EmbeddedBroker, ensure_topics
from gpuledger.schema.messages import GpuSample, SampleBatch
from gpuledger.schema.topics import Topics
from tests.fixtures.agent_node import consume_samples

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
ROOT = Path(__file__).parents[2]


def fresh_topics(broker: EmbeddedBroker, name: str) -> Topics:
    """Topics of one test, so tests sharing the broker do not read each other's records."""
    topics = Topics(prefix=f"{name}.")
    ensure_topics(broker.bootstrap, topics)
    return topics


def consume(broker: EmbeddedBroker, topic: str, count: int, timeout_s: float = 15.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    consumer.seek_to_beginning(partition)
    records: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


def samples_by_node(messages: list[tuple[str, bytes]]) -> dict[str, list[dict]]:
    """Every sample of `(key, SampleBatch value)` messages, per node, in the order received."""
    found: dict[str, list[dict]] = {}
    for key, value in messages:
        found.setdefault(key, []).extend(SampleBatch.model_validate_json(value).samples)
    return found


def test_live_agent_publishes_exactly_what_generate_produces(broker: EmbeddedBroker) -> None:
    topics = fresh_topics(broker, "live")
    started = time.monotonic()
    config = AgentConfig(
        broker.bootstrap,
        simulate=DEMO_SCENARIO,
        topic_prefix=topics.prefix,
        start=T0,
        speed=40,
        duration_s=40,
    )
    rc = run_agent(config)
    assert rc == 0
    assert time.monotonic() - started < 10  # 40 s of scenario time at 40x
    expected = list(generate(Scenario.load(DEMO_SCENARIO, origin=T0), T0, T0 + 40))
    for short in ("jobs", "nodes", "usage"):
        want = [(k, encode(m)) for t, k, m in expected if t == short]
        got = consume(broker, topics.name(short), len(want))
        assert [(r.key.decode(), r.value) for r in got] == want, short
    # Samples may travel several intervals to a message (a backlog drained at once), but
    # every one arrives once, in order, per node.
    want_samples = samples_by_node([(k, encode(m)) for t, k, m in expected if t == "samples"])
    wanted = sum(len(v) for v in want_samples.values())
    got = consume_samples(broker.bootstrap, topics.samples, wanted, timeout_s=15)
    found: dict[str, list[dict]] = {}
    for sample in got:
        found.setdefault(sample.node, []).append(sample.model_dump(mode="json"))
    assert found == {
        node: [GpuSample.model_validate(s).model_dump(mode="json") for s in samples]
        for node, samples in want_samples.items()
    }


def test_sigterm_stops_the_agent_after_flushing_what_it_read(broker: EmbeddedBroker) -> None:
    topics = fresh_topics(broker, "sigterm")
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr);"
        "from pathlib import Path;"
        "from gpuledger.agents.config import AgentConfig;"
        "from gpuledger.agents.runner import run_agent;"
        f"sys.exit(run_agent(AgentConfig({broker.bootstrap!r},"
        f" simulate=Path({str(DEMO_SCENARIO)!r}), topic_prefix={topics.prefix!r},"
        " nodes=('gcp-g2-01',), speed=5)))"
    )
    agent = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert consume(broker, topics.samples, 3, timeout_s=20), "the agent published nothing"
        agent.send_signal(signal.SIGTERM)
        _, log = agent.communicate(timeout=20)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, log
    summary = next(line for line in log.splitlines() if "agent stopped" in line)
    read = int(summary.split("agent stopped: ")[1].split(" samples")[0])
    assert f"{read} samples delivered, 0 left in the spool" in summary
    got = consume(broker, topics.samples, 10_000, timeout_s=3)
    assert sum(len(SampleBatch.model_validate_json(r.value).samples) for r in got) == read
