"""Pods from the kubelet: names for the metrics, job labels for processes that have none."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuledger.agents.attribution import ProcAttributor
from gpuledger.agents.kubelet import (
    KubeletPods,
    PodLabelAttributor,
    labels_from_pod,
    parse_pod_list,
)
from gpuledger.agents.metrics import PodInfo
from gpuledger.schema.messages import JobType
from tests.fixtures.kubelet_server import KubeletServer

FIXTURES = Path(__file__).parents[1] / "fixtures"
POD_LIST = json.loads((FIXTURES / "kubelet" / "pods.json").read_text())
POD = "8d1e4c2a-5b7f-4e3d-9a6c-1f2b3c4d5e6f"
CID = "4f2a9c1be0d3785a6c9e21f0b7d4a8c35e6f1b2d9a0c7e4f3b8d1a6c5e2f9b07"
TOKEN = "kubelet-reader-token"


@pytest.fixture
def kubelet() -> Iterator[str]:
    server = KubeletServer(POD_LIST, token=TOKEN)
    yield server.url
    server.close()


def test_the_pod_list_gives_names_namespaces_containers_and_labels() -> None:
    pods = parse_pod_list(POD_LIST)
    assert set(pods) == {POD, "0c5f6a4e-2d1b-4b8a-9f3e-7a6b5c4d3e2f"}  # the broken one is skipped
    chat = pods[POD]
    assert (chat.name, chat.namespace, chat.containers[CID]) == (
        "chat-7d9f8b6c5-x2kqp",
        "inference",
        "server",
    )
    labels = labels_from_pod(chat)
    assert (labels.job_id, labels.team, labels.project) == ("chat-endpoint", "product", "assistant")
    assert (labels.model, labels.environment) == ("llama-3-8b-chat", "prod")
    pending = labels_from_pod(pods["0c5f6a4e-2d1b-4b8a-9f3e-7a6b5c4d3e2f"])
    assert pending.job_type == JobType.training and pending.job_id is None


def test_pods_are_looked_up_without_waiting_and_the_token_is_sent(
    kubelet: str, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    pods = KubeletPods(kubelet, token_file=token, refresh_s=60).start()
    try:
        pods.pod(POD)  # unknown yet: asks for the list, answers None at once
        found = None
        for _ in range(100):
            found = pods(POD, CID)
            if found is not None:
                break
            threading.Event().wait(0.05)
        assert found == PodInfo("chat-7d9f8b6c5-x2kqp", "inference", "server")
        assert pods("no-such-pod", None) is None
    finally:
        pods.close()


def test_a_kubelet_that_refuses_leaves_pods_unnamed_and_says_why(
    kubelet: str, caplog: pytest.LogCaptureFixture
) -> None:
    pods = KubeletPods(kubelet, token_file=None, refresh_s=60).start()
    try:
        for _ in range(100):
            if pods.errors:
                break
            threading.Event().wait(0.05)
        assert pods.errors >= 1 and pods(POD, CID) is None
    finally:
        pods.close()
    assert "cannot read the kubelet's pod list" in caplog.text and "401" in caplog.text


def test_pod_labels_fill_in_what_the_process_environment_does_not_say(
    kubelet: str, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    pods = KubeletPods(kubelet, token_file=token, refresh_s=60).start()
    try:
        attribute = PodLabelAttributor(ProcAttributor(FIXTURES / "proc"), pods)
        for _ in range(100):
            if pods.generation:
                break
            threading.Event().wait(0.05)
        # fixture 1002: a containerd process of that pod whose environment says
        # GPULEDGER_JOB_ID=chat, GPULEDGER_JOB_TYPE=Inference and nothing about its team
        found = attribute(1002)
        assert found.labels.job_id == "chat"  # the environment wins
        assert (found.labels.team, found.labels.project) == ("product", "assistant")
        assert found.labels.job_type == JobType.inference
        assert attribute(1002) is found  # cached while nothing changed
        assert attribute(1001).labels.team == "research"  # not in a pod: untouched
    finally:
        pods.close()
