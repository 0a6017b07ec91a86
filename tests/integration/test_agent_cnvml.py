"""The reader on the C ABI: unchanged pynvml, loaded from LD_LIBRARY_PATH, over a simulated driver.

The simulated `libnvidia-ml.so.1` is compiled here from NVIDIA's `nvml.h` (PyPI
`nvidia-nvml-dev`); if it cannot be built these tests fail, they do not skip. The reads happen
in a child process that found the library the way an agent on a GPU node finds the driver's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from gpuledger.agents.nvml import NvmlReader
from gpuledger.agents.runner import DEMO_SCENARIO
from gpuledger.agents.sim.engine import Scenario
from gpuledger.agents.sim.libnvml import layout
from gpuledger.agents.sim.libnvml.build import LIBRARY, build_library
from gpuledger.agents.sim.libnvml.feed import NvmlFeed
from gpuledger.agents.sim.nvml import SimulatedNvml
from tests.fixtures.nvml_host import NvmlError, NvmlHost

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
ROOT = Path(__file__).parents[2]
A100_MIG = {"name": "NVIDIA A100-SXM4-80GB", "mig": ["3g.40gb", "2g.20gb", "1g.10gb"]}
TRAIN = {"job_id": "train", "node": "n1", "gpus": [0], "team": "research", "mem_gb": 40}


@pytest.fixture(scope="module")
def host(library: Path) -> Iterator[NvmlHost]:
    running = NvmlHost(library)
    yield running
    running.close()


def node(jobs: list[dict[str, Any]], gpus: list[dict[str, Any]] | None = None) -> Scenario:
    return Scenario.from_dict(
        {
            "scenario": {"seed": 11},
            "nodes": [
                {
                    "name": "n1",
                    "gpus": gpus or [{"name": "NVIDIA H100 80GB HBM3", "count": 2}, A100_MIG],
                }
            ],
            "jobs": jobs,
        },
        origin=T0,
    )


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Node:
    """One simulated node: the feed (this process) and a reader in the host (the child)."""

    def __init__(self, host: NvmlHost, feed: NvmlFeed) -> None:
        self.host = host
        self.feed = feed

    def read(self, t: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        self.feed.show(t)
        reply = self.host.ask("read", now=t)
        return {s["gpu_uuid"]: s for s in reply["samples"]}, reply["stats"]


@pytest.fixture
def open_node(host: NvmlHost, tmp_path: Path) -> Iterator[Any]:
    """Opens a node: the library maps one state file at a time (read at nvmlInit)."""
    feeds: list[NvmlFeed] = []

    def opener(scenario: Scenario, name: str = "n1", quirks: int = 0) -> Node:
        if feeds:
            host.ask("shutdown")
        feed = NvmlFeed(
            tmp_path / f"{name}-{len(feeds)}.state",
            scenario,
            name,
            proc_root=tmp_path / f"{name}-{len(feeds)}",
            quirks=quirks,
        )
        feeds.append(feed)
        host.ask("init", state=str(feed.path))
        host.ask("reader", node=name, proc_root=str(feed.proc_root))
        return Node(host, feed)

    yield opener
    if feeds:
        host.ask("shutdown")
    for feed in feeds:
        feed.close()


def test_the_library_builds_from_nvidia_nvml_h_and_exports_the_versioned_calls(
    library: Path,
) -> None:
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(library / LIBRARY)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in (
        "nvmlInitWithFlags",
        "nvmlInit_v2",
        "nvmlDeviceGetCount_v2",
        "nvmlDeviceGetHandleByIndex_v2",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
        "nvmlDeviceGetProcessUtilization",
        "nvmlDeviceGetMigDeviceHandleByIndex",
        "nvmlErrorString",
        "nvmlGpmQueryDeviceSupport",
        "nvmlGpmSampleAlloc",
        "nvmlGpmSampleGet",
        "nvmlGpmMigSampleGet",
        "nvmlGpmMetricsGet",
        "nvmlGpmSampleFree",
    ):
        assert f" T {name}\n" in symbols, name


def test_the_c_library_and_the_python_shim_report_the_same_fleet(open_node: Any) -> None:
    scenario = Scenario.load(DEMO_SCENARIO, origin=T0)
    for name in scenario.node_names:
        c_node = open_node(scenario, name)
        clock = Clock(T0)
        sim = SimulatedNvml(scenario, name, clock)
        shim = NvmlReader(sim, name, clock, attribute=sim.attribute)
        shim.init()
        for t in [T0 + s for s in range(1, 25)] + [T0 + 600, T0 + 601, T0 + 605]:
            clock.t = t
            samples, _ = shim.read(t)
            from_c, _ = c_node.read(t)
            assert list(from_c.values()) == [s.model_dump(mode="json") for s in samples], (name, t)


def mean_sm_active(scenario: Scenario, gpu: int, mig: int | None, t1: float, t2: float) -> float:
    """SM activity over (t1, t2] by hand from the engine's per-second states."""
    total = 0.0
    for second in range(int(t1) + 1, int(t2) + 1):
        state = scenario.hardware("n1", second).gpus[gpu]
        total += (state.activity if mig is None else state.mig[mig].activity).sm_active
    return total / (t2 - t1)


def test_gpm_on_the_c_abi_measures_sm_activity_between_two_samples(
    open_node: Any, host: NvmlHost
) -> None:
    h100 = "NVIDIA H100 80GB HBM3"
    scenario = node(
        [
            {"job_id": "spin", "node": "n1", "gpus": [0], "profile": "tiny_kernel"},
            {"job_id": "serve", "node": "n1", "gpus": [1], "mig_instance": 0, "util": 0.8},
            {"job_id": "old", "node": "n1", "gpus": [2]},
        ],
        gpus=[
            {"name": h100},
            {"name": h100, "mig": ["3g.40gb", "1g.10gb"]},
            {**A100_MIG, "mig": None},
        ],
    )
    c_node = open_node(scenario)
    gpus = scenario.gpus("n1")
    first, _ = c_node.read(T0 + 100)
    assert first[gpus[0].uuid]["sm_active"] is None  # one sample: nothing between two yet
    c_node.read(T0 + 101)
    # the counters run on while nobody reads: a 3-second interval measures its mean
    samples, stats = c_node.read(T0 + 104)
    spin, serve, idle_slice, old = (
        samples[gpus[0].uuid],
        samples[gpus[1].mig[0].uuid],
        samples[gpus[1].mig[1].uuid],
        samples[gpus[2].uuid],
    )
    assert spin["util_sm"] > 0.95 and spin["sm_active"] < 0.05
    assert spin["sm_active"] == pytest.approx(
        mean_sm_active(scenario, 0, None, T0 + 101, T0 + 104), abs=5e-5
    )
    assert (
        serve["util_sm"]
        == serve["sm_active"]
        == pytest.approx(mean_sm_active(scenario, 1, 0, T0 + 101, T0 + 104), abs=5e-5)
    )
    assert idle_slice["util_sm"] == 0.0
    assert old["util_sm"] > 0.5 and old["sm_active"] is None
    assert not [call for call in stats["errors_by_call"] if call.startswith("nvmlGpm")]
    assert host.call("nvmlGpmQueryDeviceSupport", {"gpu": 0})["isSupportedDevice"] == 1
    assert host.call("nvmlGpmQueryDeviceSupport", {"gpu": 2})["isSupportedDevice"] == 0
    # a failed sample: None and a count, never an exception
    c_node.feed.fail("nvmlGpmSampleGet", pynvml.NVML_ERROR_UNKNOWN, uuid=gpus[0].uuid, times=1)
    samples, stats = c_node.read(T0 + 105)
    assert samples[gpus[0].uuid]["sm_active"] is None
    assert stats["errors_by_call"]["nvmlGpmSampleGet:Unknown"] == 1


def test_mig_instances_have_their_own_uuid_profile_and_no_utilization(
    open_node: Any, host: NvmlHost
) -> None:
    scenario = node(
        [
            {"job_id": "serve", "node": "n1", "gpus": [2], "mig_instance": 0, "mem_gb": 20},
            {"job_id": "eval", "node": "n1", "gpus": [2], "mig_instance": 2, "mem_gb": 5},
        ]
    )
    c_node = open_node(scenario)
    samples, stats = c_node.read(T0 + 100)
    gpu = scenario.gpus("n1")[2]
    migs = [samples[m.uuid] for m in gpu.mig]
    assert gpu.uuid not in samples
    assert [s["mig_profile"] for s in migs] == ["3g.40gb", "2g.20gb", "1g.10gb"]
    assert all(s["util_sm"] is None and s["power_w"] is None for s in migs)
    assert [p["labels"]["job_id"] for p in migs[0]["processes"]] == ["serve"]
    assert migs[0]["processes"][0]["util_sm"] is None  # no per-process utilization in MIG mode
    # asked of the two instances that have processes
    assert stats["errors_by_call"]["nvmlDeviceGetProcessUtilization:NotSupported"] == 2
    reply = host.ask("read", now=T0 + 101)
    devices = reply["devices"]
    assert [devices[m.uuid]["gpu_instance_id"] for m in gpu.mig] == [1, 2, 3]
    assert {devices[m.uuid]["parent_uuid"] for m in gpu.mig} == {gpu.uuid}
    # what pynvml itself raises on a MIG handle, as NVML documents
    assert host.call("nvmlDeviceGetName", {"gpu": 2, "mig": 1}).endswith(" MIG 2g.20gb")
    with pytest.raises(NvmlError) as refused:
        host.call("nvmlDeviceGetUtilizationRates", {"gpu": 2, "mig": 0})
    assert refused.value.name == "NotSupported"
    with pytest.raises(NvmlError) as empty_slot:
        host.call("nvmlDeviceGetMigDeviceHandleByIndex", {"gpu": 2}, 5)
    assert empty_slot.value.name == "NotFound"


def test_unsupported_fields_and_a_lost_gpu_give_none_and_counts(open_node: Any) -> None:
    scenario = node([TRAIN])
    c_node = open_node(scenario)
    lost = scenario.gpus("n1")[1].uuid
    c_node.feed.fail("nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_NOT_SUPPORTED)
    c_node.feed.fail("nvmlDeviceGetUUID", pynvml.NVML_ERROR_GPU_IS_LOST, uuid=lost)
    samples, stats = c_node.read(T0 + 50)
    first = samples[scenario.gpus("n1")[0].uuid]
    assert first["power_w"] is None and first["util_sm"] is not None
    assert lost not in samples
    assert stats["skipped_devices"] == 1 and stats["errors"]["GpuIsLost"] == 1
    assert stats["errors_by_call"]["nvmlDeviceGetPowerUsage:NotSupported"] == 1 + 3


def test_a_process_that_exits_after_being_listed_keeps_its_memory_and_loses_labels(
    open_node: Any,
) -> None:
    scenario = node([{**TRAIN, "processes": [{"name": "trainer", "pid": 4242}]}])
    c_node = open_node(scenario)
    c_node.feed.show(T0 + 50)
    # listed by the count call and the fill call, gone before its utilization is asked
    c_node.feed.kill(4242, after_call="nvmlDeviceGetComputeRunningProcesses_v3", calls=2)
    reply = c_node.host.ask("read", now=T0 + 50)
    (process,) = reply["samples"][0]["processes"]
    assert process["pid"] == 4242 and process["mem_used_bytes"] == 40 * 1024**3
    assert process["util_sm"] is None  # a busy GPU without a sample for it: unknown
    assert process["name"] == "" and process["labels"]["job_id"] is None
    assert reply["stats"]["errors_by_call"]["nvmlSystemGetProcessName:NotFound"] == 1


def test_a_process_that_exits_between_the_two_list_calls_is_not_reported(open_node: Any) -> None:
    scenario = node(
        [{**TRAIN, "processes": [{"name": "a", "pid": 501}, {"name": "b", "pid": 502}]}]
    )
    c_node = open_node(scenario)
    c_node.feed.show(T0 + 50)
    c_node.feed.kill(502, after_call="nvmlDeviceGetComputeRunningProcesses_v3", calls=1)
    reply = c_node.host.ask("read", now=T0 + 50)
    assert [p["pid"] for p in reply["samples"][0]["processes"]] == [501]
    assert not [call for call in reply["stats"]["errors_by_call"] if "Processes" in call]


def test_samples_that_land_between_the_two_utilization_calls_are_read_again(
    open_node: Any,
) -> None:
    scenario = node([{**TRAIN, "profile": "bursty"}])
    c_node = open_node(scenario)
    uuid = scenario.gpus("n1")[0].uuid
    c_node.read(T0 + 100)
    c_node.feed.show(T0 + 101)
    # pynvml sizes its array from the first call; a sample arrives before the second
    c_node.feed.show(T0 + 101.7, after_call="nvmlDeviceGetProcessUtilization")
    reply = c_node.host.ask("read", now=T0 + 101)
    (process,) = reply["samples"][0]["processes"]
    window = scenario.process_utilization("n1", 0, T0 + 100, T0 + 101.7)
    assert len(window) == 4  # two in the interval, two more by the second call
    assert process["util_sm"] == pytest.approx(sum(s.sm_util for s in window) / 4 / 100)
    assert (
        "nvmlDeviceGetProcessUtilization:InsufficientSize" not in reply["stats"]["errors_by_call"]
    )
    assert reply["samples"][0]["gpu_uuid"] == uuid


def test_drivers_that_answer_with_capacity_unsorted_and_repeated_samples_change_nothing(
    open_node: Any,
) -> None:
    scenario = node([{**TRAIN, "profile": "bursty"}])
    quirky = layout.QUIRK_UTIL_COUNT_IS_CAPACITY | layout.QUIRK_UTIL_UNSORTED
    quirky |= layout.QUIRK_UTIL_IGNORES_LAST_SEEN
    documented = open_node(scenario)
    expected = [documented.read(T0 + t)[0] for t in (100, 101, 102, 105, 106)]
    odd = open_node(scenario, quirks=quirky)
    got = [odd.read(T0 + t)[0] for t in (100, 101, 102, 105, 106)]
    assert got == expected


def test_timestamps_that_repeat_or_skip_cover_each_interval_once(open_node: Any) -> None:
    scenario = node([{**TRAIN, "profile": "bursty"}])
    c_node = open_node(scenario)
    uuid = scenario.gpus("n1")[0].uuid
    c_node.read(T0 + 100)
    repeated, stats = c_node.read(T0 + 100)
    assert repeated == {} and stats["repeated"]
    skipped, _ = c_node.read(T0 + 104)  # three ticks missed: one sample for [100, 104)
    sample = skipped[uuid]
    assert (sample["ts"], sample["interval_s"]) == (T0 + 100, 4.0)
    window = scenario.process_utilization("n1", 0, T0 + 100, T0 + 104)
    expected = sum(s.sm_util for s in window) / len(window) / 100
    assert sample["processes"][0]["util_sm"] == pytest.approx(expected)


def test_a_driver_older_than_r510_without_v3_calls_still_lists_processes(
    tmp_path: Path,
) -> None:
    old = NvmlHost(build_library(tmp_path / "old-driver", old_driver=True))
    try:
        scenario = node([TRAIN])
        with NvmlFeed(tmp_path / "n1.state", scenario, "n1", proc_root=tmp_path / "proc") as feed:
            old.ask("init", state=str(feed.path))
            old.ask("reader", node="n1", proc_root=str(tmp_path / "proc"))
            for t in (T0 + 50, T0 + 51):
                feed.show(t)
                reply = old.ask("read", now=t)
                processes = reply["samples"][0]["processes"]
                assert [p["labels"]["job_id"] for p in processes] == ["train"]
            # the fallback is remembered: no FunctionNotFound on the second read
            assert "FunctionNotFound" not in reply["stats"]["errors"]
            old.ask("shutdown")
    finally:
        old.close()


def test_without_a_state_file_the_library_says_the_driver_is_not_loaded(host: NvmlHost) -> None:
    with pytest.raises(NvmlError) as refused:
        host.ask("init", state="")
    assert refused.value.name == "DriverNotLoaded"


def agent_without_gpus(library_path: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": library_path,
        "GPULEDGER_BOOTSTRAP": "127.0.0.1:9",
        "GPULEDGER_DATA_DIR": str(tmp_path),
        "COLUMNS": "300",
    }
    env.pop("GPULEDGER_SIMNVML_STATE", None)
    return subprocess.run(
        [sys.executable, "-m", "gpuledger.cli", "agent", "--node-name", "n1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_agent_on_a_node_without_a_driver_says_what_it_looked_for(
    library: Path, tmp_path: Path
) -> None:
    no_library = agent_without_gpus(str(tmp_path / "empty"), tmp_path)
    assert no_library.returncode == 2
    assert "libnvidia-ml.so.1 was not found" in " ".join(no_library.stderr.split())
    no_driver = agent_without_gpus(str(library), tmp_path)
    assert no_driver.returncode == 2
    message = " ".join(no_driver.stderr.split())
    assert f"loaded from {library / LIBRARY}" in message and "Driver Not Loaded" in message
