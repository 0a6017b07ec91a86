"""The simulated NVML answers with pynvml's own types and errors, as NVML documents them."""

from __future__ import annotations

import ctypes

import pynvml
import pytest

from gpuledger.agents.sim.engine import Scenario
from gpuledger.agents.sim.nvml import SimulatedNvml

T0 = 1_700_000_000.0


@pytest.fixture
def nvml() -> SimulatedNvml:
    scenario = Scenario.from_dict(
        {
            "nodes": [
                {
                    "name": "n1",
                    "gpus": [
                        {"name": "NVIDIA L4"},
                        {"name": "NVIDIA A100-SXM4-80GB", "mig": ["3g.40gb", "1g.10gb"]},
                    ],
                }
            ],
            "jobs": [
                {"job_id": "a", "node": "n1", "gpus": [0], "processes": [{"pid": 77}]},
                {"job_id": "b", "node": "n1", "gpus": [1], "mig_instance": 1},
            ],
        },
        origin=T0,
    )
    sim = SimulatedNvml(scenario, "n1", lambda: T0 + 60)
    sim.nvmlInit()
    return sim


def test_calls_before_init_raise_uninitialized_like_pynvml() -> None:
    scenario = Scenario.from_dict(
        {"nodes": [{"name": "n", "gpus": [{"name": "NVIDIA L4"}]}]}, origin=T0
    )
    sim = SimulatedNvml(scenario, "n", lambda: T0)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        sim.nvmlDeviceGetCount()


def test_values_come_in_pynvml_structures_and_units(nvml: SimulatedNvml) -> None:
    assert nvml.nvmlDeviceGetCount() == 2
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    util = nvml.nvmlDeviceGetUtilizationRates(handle)
    assert isinstance(util, pynvml.c_nvmlUtilization_t) and 0 <= util.gpu <= 100
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    assert isinstance(memory, pynvml.c_nvmlMemory_t)
    assert memory.total == memory.used + memory.free == 23034 * 2**20
    assert 7_000 <= nvml.nvmlDeviceGetPowerUsage(handle) <= 72_000  # milliwatts
    assert nvml.nvmlDeviceGetEnforcedPowerLimit(handle) == 72_000
    assert isinstance(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU), int)
    (process,) = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    assert isinstance(process, pynvml.nvmlFriendlyObject)
    assert (process.pid, process.gpuInstanceId) == (77, 0xFFFFFFFF)
    assert nvml.nvmlDeviceGetGraphicsRunningProcesses(handle) == []
    samples = nvml.nvmlDeviceGetProcessUtilization(handle, int((T0 + 58) * 1e6))
    assert all(isinstance(s, pynvml.c_nvmlProcessUtilizationSample_t) for s in samples)
    assert [s.pid for s in samples] == [77] * 4
    assert nvml.nvmlSystemGetDriverVersion() == "550.54.15"


def test_process_utilization_after_the_newest_sample_is_not_found(nvml: SimulatedNvml) -> None:
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    newest = max(s.timeStamp for s in nvml.nvmlDeviceGetProcessUtilization(handle, 0))
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetProcessUtilization(handle, newest)


def test_mig_is_reached_and_limited_as_nvml_documents(nvml: SimulatedNvml) -> None:
    l4 = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetMigMode(l4)
    a100 = nvml.nvmlDeviceGetHandleByIndex(1)
    assert nvml.nvmlDeviceGetMigMode(a100) == [pynvml.NVML_DEVICE_MIG_ENABLE] * 2
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(a100) == 7
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetUtilizationRates(a100)
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetMigDeviceHandleByIndex(a100, 2)  # an empty slot
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(a100, 1)
    is_mig = nvml.nvmlDeviceIsMigDeviceHandle(mig)
    assert isinstance(is_mig, ctypes.c_uint) and is_mig.value == 1
    assert nvml.nvmlDeviceGetName(mig) == "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
    assert nvml.nvmlDeviceGetUUID(mig).startswith("MIG-")
    assert nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig) == a100
    assert nvml.nvmlDeviceGetIndex(mig) == 1
    assert nvml.nvmlDeviceGetAttributes(mig).gpuInstanceSliceCount == 1
    assert [p.gpuInstanceId for p in nvml.nvmlDeviceGetComputeRunningProcesses(mig)] == [2]
    for call in (
        nvml.nvmlDeviceGetUtilizationRates,
        nvml.nvmlDeviceGetPowerUsage,
        nvml.nvmlDeviceGetEnforcedPowerLimit,
    ):
        with pytest.raises(pynvml.NVMLError_NotSupported):
            call(mig)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetProcessUtilization(mig, 0)


def test_injected_faults_and_missing_functions_raise_pynvml_errors(nvml: SimulatedNvml) -> None:
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    nvml.fail("nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_GPU_IS_LOST, times=1)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetPowerUsage(handle)
    assert nvml.nvmlDeviceGetPowerUsage(handle) > 0
    nvml.remove_function("nvmlDeviceGetTemperature")
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        nvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        nvml.nvmlDeviceGetFanSpeed(handle)  # in pynvml, not simulated: as if the driver lacked it


def test_attribution_of_simulated_processes_uses_the_real_parsers(nvml: SimulatedNvml) -> None:
    found = nvml.attribute(77)
    assert found.name == "python" and found.labels.job_id == "a"
    assert found.container_id is None  # runtime "host"
    nvml.kill(77)
    assert nvml.attribute(77).labels.job_id is None
    assert nvml.nvmlDeviceGetComputeRunningProcesses(nvml.nvmlDeviceGetHandleByIndex(0)) == []
