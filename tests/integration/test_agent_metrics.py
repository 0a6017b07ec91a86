"""An SRE installs the agent on a GPU node and points Prometheus at it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpuledger.broker import EmbeddedBroker
from gpuledger.schema.topics import Topics
from tests.fixtures.agent_node import NODE, GpuNode, consume_samples, summary_counts
from tests.fixtures.kubelet_server import KubeletServer
from tests.support import wait_until

pytestmark = pytest.mark.integration


def test_prometheus_scrapes_dcgm_metrics_with_pods_jobs_and_the_agents_counters(
    gpu_node: GpuNode, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    kubelet = KubeletServer(gpu_node.pod_list())
    agent = gpu_node.agent(
        broker.bootstrap, "--spool-dir", str(tmp_path / "spool"), "--kubelet-url", kubelet.url
    )
    try:

        def with_pods() -> dict[str, list[Any]] | None:
            families = agent.metrics()
            used = families.get("DCGM_FI_DEV_FB_USED")
            return families if used and any(s.labels["pod"] for s in used) else None

        families = wait_until(
            with_pods,
            timeout_s=20,
            every_s=0.2,
            what="a read with the kubelet's pod names on /metrics",
        )
        gpus = gpu_node.scenario.gpus(NODE)
        used = {
            (s.labels["UUID"], s.labels["GPU_I_ID"]): s for s in families["DCGM_FI_DEV_FB_USED"]
        }
        # two H100s, the L4, and the A100 as its two MIG instances (labelled with its UUID)
        assert set(used) == {
            (gpus[0].uuid, ""),
            (gpus[1].uuid, ""),
            (gpus[2].uuid, "1"),
            (gpus[2].uuid, "2"),
            (gpus[3].uuid, ""),
        }
        h100 = used[(gpus[0].uuid, "")]
        assert h100.value == 60 * 1024 and h100.labels["Hostname"] == NODE
        assert h100.labels["modelName"] == "NVIDIA H100 80GB HBM3"
        assert used[(gpus[2].uuid, "1")].labels["GPU_I_PROFILE"] == "3g.40gb"
        # dcgm-exporter's pod labels, on a whole GPU and on a MIG instance
        assert (h100.labels["pod"], h100.labels["namespace"]) == ("llm-train-pod", "ml")
        rag = used[(gpus[2].uuid, "1")]
        assert (rag.labels["pod"], rag.labels["container"]) == ("rag-pod", "python")
        assert used[(gpus[2].uuid, "2")].labels["pod"] == ""  # the idle instance
        util = {s.labels["UUID"]: s.value for s in families["DCGM_FI_DEV_GPU_UTIL"]}
        assert util[gpus[3].uuid] == 0.0 and util[gpus[0].uuid] > 50
        processes = families["gpuledger_process_fb_used"]
        assert {(s.labels["gpu"], s.labels["job_id"], s.labels["team"]) for s in processes} == {
            ("0", "llm-train", "research"),
            ("1", "llm-train", "research"),
            ("2", "rag", "product"),
        }
        assert all(s.labels["pod_uid"] and s.labels["container_id"] for s in processes)
        # "rag" says nothing in its environment: its job and team come from its pod's labels
        wait_until(
            lambda: agent.metric("gpuledger_agent_samples_sent_total") >= 10,
            timeout_s=20,
            every_s=0.2,
            what="sends",
        )
        assert agent.metric("gpuledger_agent_kafka_connected") == 1.0
        assert agent.metric("gpuledger_agent_samples_dropped_total") == 0.0
        assert "process_resident_memory_bytes" in agent.metrics()
    finally:
        rc, summary = agent.stop()
        kubelet.close()
    assert rc == 0, agent.log()
    counts = summary_counts(summary)
    assert counts["delivered"] == counts["read"] and counts["left"] == 0
    samples = consume_samples(broker.bootstrap, Topics().samples, counts["read"])
    assert len(samples) == counts["read"]
    rag = [p for s in samples for p in s.processes if p.labels.job_id == "rag"]
    assert rag and all(p.labels.team == "product" for p in rag)  # from the pod, from the start
    mig = [s for s in samples if s.mig_profile is not None]
    assert mig and all(s.gpu_name == "NVIDIA A100-SXM4-80GB" and s.util_sm is None for s in mig)
