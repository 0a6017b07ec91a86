"""The /metrics catalogue: dcgm-exporter's names, units and labels, per-process series, counters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpuledger.agents.metrics import AgentMetrics, CatalogueError, PodInfo, load_catalogue
from gpuledger.agents.nvml import NvmlReader
from gpuledger.agents.sim.engine import Scenario
from gpuledger.agents.sim.nvml import SimulatedNvml

T0 = 1_700_000_000.0


def fleet() -> Scenario:
    return Scenario.from_dict(
        {
            "scenario": {"seed": 3},
            "nodes": [
                {
                    "name": "gpu-node-7",
                    "gpus": [
                        {"name": "NVIDIA H100 80GB HBM3", "count": 2},
                        {"name": "NVIDIA A100-SXM4-80GB", "mig": ["3g.40gb", "1g.10gb"]},
                    ],
                }
            ],
            "jobs": [
                {"job_id": "train", "node": "gpu-node-7", "gpus": [0], "team": "research",
                 "project": "llm", "job_type": "training", "runtime": "kubernetes", "mem_gb": 40},
                {"job_id": "chat", "node": "gpu-node-7", "gpus": [1], "team": "product",
                 "profile": "shared", "runtime": "kubernetes", "mem_gb": 10},
                {"job_id": "batch", "node": "gpu-node-7", "gpus": [1], "team": "data",
                 "profile": "shared", "runtime": "docker", "mem_gb": 6},
                {"job_id": "serve", "node": "gpu-node-7", "gpus": [2], "mig_instance": 1,
                 "runtime": "kubernetes", "mem_gb": 4},
            ],
        },
        origin=T0,
    )  # fmt: skip


def scrape(metrics: AgentMetrics) -> dict[str, list[Any]]:
    registry = CollectorRegistry()
    registry.register(metrics)
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def read_fleet(pods: Any = None) -> tuple[Scenario, NvmlReader, dict[str, list[Any]]]:
    scenario = fleet()
    clock = [T0 + 60]
    sim = SimulatedNvml(scenario, "gpu-node-7", lambda: clock[0])
    reader = NvmlReader(sim, "gpu-node-7", lambda: clock[0], attribute=sim.attribute)
    reader.init()
    metrics = AgentMetrics(pods=pods)
    samples, stats = reader.read(T0 + 60)
    metrics.observe("gpu-node-7", samples, reader.devices, stats)
    return scenario, reader, scrape(metrics)


def one(series: list[Any], **labels: str) -> Any:
    (found,) = [s for s in series if all(s.labels.get(k) == v for k, v in labels.items())]
    return found


def test_gpu_series_carry_dcgm_exporter_names_units_and_labels() -> None:
    scenario, _, families = read_fleet()
    truth = scenario.hardware("gpu-node-7", T0 + 60).gpus[0]
    gpu0 = truth.gpu
    util = one(families["DCGM_FI_DEV_GPU_UTIL"], UUID=gpu0.uuid)
    assert util.value == round(100 * truth.util_gpu)  # percent, as dcgm-exporter
    assert util.labels["gpu"] == "0" and util.labels["device"] == "nvidia0"
    assert util.labels["modelName"] == "NVIDIA H100 80GB HBM3"
    assert util.labels["Hostname"] == "gpu-node-7"
    assert util.labels["GPU_I_PROFILE"] == "" and util.labels["GPU_I_ID"] == ""
    assert one(families["DCGM_FI_DEV_FB_USED"], UUID=gpu0.uuid).value == 40 * 1024  # MiB
    total = one(families["DCGM_FI_DEV_FB_TOTAL"], UUID=gpu0.uuid).value
    free = one(families["DCGM_FI_DEV_FB_FREE"], UUID=gpu0.uuid).value
    assert total == 81559 and free == total - 40 * 1024
    assert one(families["DCGM_FI_DEV_POWER_USAGE"], UUID=gpu0.uuid).value == pytest.approx(
        truth.power_w, abs=1e-3
    )
    assert one(families["DCGM_FI_DEV_GPU_TEMP"], UUID=gpu0.uuid).value == truth.temp_c


def test_mig_instances_are_labelled_with_the_parent_uuid_profile_and_instance_id() -> None:
    scenario, _, families = read_fleet()
    a100 = scenario.gpus("gpu-node-7")[2]
    used = families["DCGM_FI_DEV_FB_USED"]
    instances = sorted(
        (s.labels["GPU_I_ID"], s.labels["GPU_I_PROFILE"], s.value)
        for s in used
        if s.labels["UUID"] == a100.uuid
    )
    assert instances == [("1", "3g.40gb", 0.0), ("2", "1g.10gb", 4 * 1024.0)]
    # MIG instances report no utilization: no series rather than a made-up 0
    assert all(s.labels["UUID"] != a100.uuid for s in families["DCGM_FI_DEV_GPU_UTIL"])


def test_each_process_has_a_series_with_its_job_team_and_project() -> None:
    _, _, families = read_fleet()
    processes = families["gpuledger_process_fb_used"]
    assert {s.labels["job_id"] for s in processes} == {"train", "chat", "batch", "serve"}
    train = one(processes, job_id="train")
    assert (train.labels["team"], train.labels["project"]) == ("research", "llm")
    assert train.labels["job_type"] == "training" and train.value == 40 * 1024
    assert train.labels["pod_uid"] and train.labels["container_id"]
    shared = [s for s in families["gpuledger_process_gpu_util"] if s.labels["gpu"] == "1"]
    assert {s.labels["team"] for s in shared} == {"product", "data"}


def test_pods_name_the_gpu_they_hold_alone_and_every_process() -> None:
    names: dict[str, PodInfo] = {}

    def pods(pod_uid: str, container_id: str | None) -> PodInfo:
        return names.setdefault(pod_uid, PodInfo(f"pod-{len(names)}", "ml", "main"))

    _, _, families = read_fleet(pods)
    util = families["DCGM_FI_DEV_GPU_UTIL"]
    alone = one(util, gpu="0")
    assert (alone.labels["pod"], alone.labels["namespace"], alone.labels["container"]) == (
        names[one(families["gpuledger_process_fb_used"], job_id="train").labels["pod_uid"]].name,
        "ml",
        "main",
    )
    # GPU 1 is shared by a pod and a docker container: no single pod to name
    assert one(util, gpu="1").labels["pod"] == ""
    chat = one(families["gpuledger_process_fb_used"], job_id="chat")
    assert chat.labels["pod"].startswith("pod-") and chat.labels["namespace"] == "ml"


def test_agent_counters_come_with_the_nvml_errors_by_call() -> None:
    counters = {"gpuledger_agent_samples_sent": 40.0, "gpuledger_agent_samples_dropped": 2.0}
    scenario = fleet()
    sim = SimulatedNvml(scenario, "gpu-node-7", lambda: T0 + 5)
    reader = NvmlReader(sim, "gpu-node-7", lambda: T0 + 5, attribute=sim.attribute)
    reader.init()
    metrics = AgentMetrics(counters=lambda: counters)
    samples, stats = reader.read(T0 + 5)
    metrics.observe("gpu-node-7", samples, reader.devices, stats)
    families = scrape(metrics)
    assert families["gpuledger_agent_samples_sent"][0].value == 40.0
    assert families["gpuledger_agent_samples_dropped"][0].value == 2.0
    assert families["gpuledger_agent_samples_read"][0].value == len(samples)
    errors = one(
        families["gpuledger_agent_nvml_errors"],
        function="nvmlDeviceGetUtilizationRates",
        error="NotSupported",
    )
    assert errors.value == 2  # the two MIG instances


def test_a_catalogue_mistake_names_the_line_and_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "metrics.csv"
    bad.write_text(
        "# comment\n"
        "DCGM_FI_DEV_GPU_UTIL, gauge, GPU utilization (in %)., gpu, util_sm, percent\n"
        "DCGM_FI_DEV_SM_CLOCK, gauge, SM clock (in MHz)., gpu, sm_clock, same\n"
    )
    with pytest.raises(CatalogueError) as refused:
        load_catalogue(bad)
    assert "metrics.csv line 3" in str(refused.value) and "'sm_clock'" in str(refused.value)
    assert [spec.name for spec in load_catalogue()][:2] == [
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_MEM_COPY_UTIL",
    ]
