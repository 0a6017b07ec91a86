"""Kafka goes away and comes back; the agent restarts; not one sample is lost or doubled.

The agent runs as on a GPU node (simulated driver, real NVML path) against the real broker
binary. The broker keeps its log in memory only, so an outage is a SIGSTOP of the broker (its
log survives) or a broker that is not started yet (ARCHITECTURE.md §5).
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from gpuledger.broker import EmbeddedBroker, ensure_topics, free_port
from gpuledger.schema.messages import GpuSample
from gpuledger.schema.topics import Topics
from tests.fixtures.agent_node import GpuNode, consume_samples, summary_counts
from tests.support import wait_until

pytestmark = pytest.mark.integration

OUTAGE_S = 30.0


def by_gpu(samples: list[GpuSample]) -> dict[tuple[str, str | None], list[GpuSample]]:
    found: dict[tuple[str, str | None], list[GpuSample]] = defaultdict(list)
    for sample in samples:
        found[(sample.gpu_uuid, sample.mig_profile)].append(sample)
    return found


def assert_each_gpu_in_order_without_gaps_or_repeats(samples: list[GpuSample]) -> None:
    for gpu, series in by_gpu(samples).items():
        stamps = [s.ts for s in series]
        assert len(set(stamps)) == len(stamps), f"{gpu}: a sample arrived twice"
        assert stamps == sorted(stamps), f"{gpu}: samples out of order"
        for earlier, later in itertools.pairwise(series):
            # each sample covers [ts, ts + interval_s): the next one starts where it ends
            assert later.ts == pytest.approx(earlier.ts + earlier.interval_s), f"{gpu}: a gap"


def test_a_30_s_broker_outage_loses_and_doubles_nothing_and_the_agent_says_so(
    gpu_node: GpuNode, tmp_path: Path
) -> None:
    topics = Topics()
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, topics)
        agent = gpu_node.agent(broker.bootstrap, "--spool-dir", str(tmp_path / "spool"))
        try:
            wait_until(
                lambda: agent.metric("gpuledger_agent_samples_sent_total") >= 10,
                timeout_s=20,
                every_s=0.2,
                what="sends",
            )
            broker.pause()
            try:
                paused = time.monotonic()
                wait_until(
                    lambda: agent.metric("gpuledger_agent_kafka_connected") == 0.0,
                    timeout_s=OUTAGE_S,
                    every_s=0.2,
                    what="the agent to notice the outage",
                )
                time.sleep(max(0.0, OUTAGE_S - 3 - (time.monotonic() - paused)))
                during: dict[str, Any] = {
                    name: agent.metric(name)
                    for name in (
                        "gpuledger_agent_spool_backlog_samples",
                        "gpuledger_agent_samples_spooled_total",
                        "gpuledger_agent_kafka_wait_seconds",
                    )
                }
                time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - paused)))
            finally:
                broker.resume()
            wait_until(
                lambda: (
                    agent.metric("gpuledger_agent_spool_backlog_samples") <= 5
                    and agent.metric("gpuledger_agent_kafka_connected") == 1.0
                ),
                timeout_s=30,
                every_s=0.2,
                what="the spool to drain",
            )
        finally:
            rc, summary = agent.stop()
        assert rc == 0, agent.log()
        counts = summary_counts(summary)
        samples = consume_samples(broker.bootstrap, topics.samples, counts["read"])
    # 5 devices, one sample each per second; ~27 s of them waited on disk
    assert during["gpuledger_agent_spool_backlog_samples"] >= 5 * (OUTAGE_S - 5)
    assert during["gpuledger_agent_samples_spooled_total"] >= 5 * (OUTAGE_S - 5)
    assert during["gpuledger_agent_kafka_wait_seconds"] >= 10
    log = agent.log()
    assert "does not take records" in log and "Kafka is back after" in log
    assert counts["delivered"] == counts["read"] and counts["left"] == counts["dropped"] == 0
    assert len(samples) == counts["read"]  # nothing lost, nothing twice
    assert_each_gpu_in_order_without_gaps_or_repeats(samples)
    assert len(by_gpu(samples)) == 5


def test_an_agent_restarted_with_a_full_spool_sends_everything_it_kept(
    gpu_node: GpuNode, tmp_path: Path
) -> None:
    topics = Topics()
    port = free_port()  # Kafka's address; nothing listens there yet
    spool = ("--spool-dir", str(tmp_path / "spool"), "--spool-max-mb", "0.03")
    first = gpu_node.agent(f"127.0.0.1:{port}", *spool, "--interval", "0.2", name="first")
    try:
        wait_until(
            lambda: first.metric("gpuledger_agent_samples_dropped_total") >= 10,
            timeout_s=30,
            every_s=0.2,
            what="the spool to fill up and drop",
        )
    finally:
        rc, summary = first.stop()
    assert rc == 1, first.log()  # records left behind
    before = summary_counts(summary)
    assert before["delivered"] == 0 and before["left"] > 0 and before["dropped"] >= 10
    assert before["read"] == before["left"] + before["dropped"]
    assert "is full" in first.log() and "wait in the spool" in first.log()

    with EmbeddedBroker(port=port) as broker:  # Kafka is back, empty
        ensure_topics(broker.bootstrap, topics)
        second = gpu_node.agent(broker.bootstrap, *spool, name="second")
        try:
            wait_until(
                lambda: second.metric("gpuledger_agent_samples_sent_total") >= before["left"] + 5,
                timeout_s=30,
                every_s=0.2,
                what="the kept samples and a new one to reach Kafka",
            )
        finally:
            rc, summary = second.stop()
        assert rc == 0, second.log()
        after = summary_counts(summary)
        samples = consume_samples(broker.bootstrap, topics.samples, before["left"] + after["read"])
    assert after["dropped"] == 0
    assert len(samples) == before["left"] + after["read"]  # what was kept, then the new ones
    assert "left by a previous agent will be sent first" in second.log()
    kept, new = samples[: before["left"]], samples[before["left"] :]
    # the oldest were dropped: what was kept is the newest stretch, unbroken, for every GPU
    assert_each_gpu_in_order_without_gaps_or_repeats(kept)
    assert_each_gpu_in_order_without_gaps_or_repeats(new)
    assert min(s.ts for s in new) > max(s.ts for s in kept)
