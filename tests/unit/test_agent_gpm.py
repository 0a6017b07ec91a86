"""GPM in the reader (SM activity, occupancy, tensor and DRAM activity) over the simulated NVML:
where a GPU has it, what MIG instances get from it, and what happens where it fails."""

from __future__ import annotations

from typing import Any

import pynvml
import pytest

from gpuledger.agents.nvml import NvmlReader
from gpuledger.agents.sim.engine import Scenario
from gpuledger.agents.sim.nvml import SimHandle, SimulatedNvml
from gpuledger.schema.messages import GpuSample

T0 = 1_700_000_000.0
H100 = "NVIDIA H100 80GB HBM3"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def fleet(jobs: list[dict[str, Any]]) -> Scenario:
    """GPU 0, 1: H100s (GPM); GPU 2: an H100 in MIG mode; GPU 3: an A100 (no GPM)."""
    return Scenario.from_dict(
        {
            "scenario": {"seed": 5},
            "nodes": [
                {
                    "name": "n1",
                    "gpus": [
                        {"name": H100, "count": 2},
                        {"name": H100, "mig": ["3g.40gb", "2g.20gb", "1g.10gb"]},
                        {"name": "NVIDIA A100-SXM4-80GB"},
                    ],
                }
            ],
            "jobs": jobs,
        },
        origin=T0,
    )


JOBS: list[dict[str, Any]] = [
    {"job_id": "train", "node": "n1", "gpus": [0], "profile": "busy", "job_type": "training"},
    {"job_id": "spin", "node": "n1", "gpus": [1], "profile": "tiny_kernel"},
    {"job_id": "serve", "node": "n1", "gpus": [2], "mig_instance": 0, "profile": "busy"},
    {"job_id": "forgotten", "node": "n1", "gpus": [2], "mig_instance": 2, "profile": "idle"},
    {"job_id": "old", "node": "n1", "gpus": [3], "profile": "busy"},
]


def reader_for(scenario: Scenario) -> tuple[NvmlReader, SimulatedNvml, Clock]:
    clock = Clock(T0)
    sim = SimulatedNvml(scenario, "n1", clock)
    reader = NvmlReader(sim, "n1", clock, attribute=sim.attribute)
    reader.init()
    return reader, sim, clock


def read(reader: NvmlReader, clock: Clock, t: float) -> dict[str, GpuSample]:
    clock.t = t
    samples, _ = reader.read(t)
    return {s.gpu_uuid: s for s in samples}


def expected_mean(scenario: Scenario, gpu: int, mig: int | None, t1: float, t2: float) -> float:
    """The mean SM activity over (t1, t2], from the engine's per-second states by hand."""
    total = 0.0
    for second in range(int(t1) + 1, int(t2) + 1):
        state = scenario.hardware("n1", second).gpus[gpu]
        total += (state.activity if mig is None else state.mig[mig].activity).sm_active
    return total / (t2 - t1)


def test_sm_activity_tells_tiny_kernels_from_real_work_where_busy_time_cannot() -> None:
    scenario = fleet(JOBS)
    reader, _, clock = reader_for(scenario)
    read(reader, clock, T0 + 100)  # the first GPM sample: nothing to measure yet
    samples = read(reader, clock, T0 + 101)
    gpus = scenario.gpus("n1")
    train, spin = samples[gpus[0].uuid], samples[gpus[1].uuid]
    # both look busy by NVML's busy time; only the training run uses its SMs
    assert train.util_sm is not None and train.util_sm > 0.7
    assert spin.util_sm is not None and spin.util_sm > 0.95
    assert spin.sm_active is not None and spin.sm_active < 0.05
    assert train.sm_active is not None and train.sm_active > 0.6
    for sample, index in ((train, 0), (spin, 1)):
        mean = expected_mean(scenario, index, None, T0 + 100, T0 + 101)
        assert sample.sm_active == pytest.approx(mean, abs=5e-5)
    assert train.tensor_active is not None and 0 < train.tensor_active <= train.sm_active
    assert train.sm_occupancy is not None and train.dram_active is not None


def test_mig_instances_get_their_utilization_from_their_own_sm_activity() -> None:
    scenario = fleet(JOBS)
    reader, _, clock = reader_for(scenario)
    read(reader, clock, T0 + 200)
    samples = read(reader, clock, T0 + 201)
    mig = scenario.gpus("n1")[2].mig
    serve, empty, forgotten = (samples[m.uuid] for m in mig)
    assert serve.sm_active is not None and serve.sm_active > 0.5
    assert serve.util_sm == serve.sm_active  # NVML has no busy time for a MIG instance
    assert forgotten.util_sm == forgotten.sm_active == 0.0  # an idle slice, now measurable
    assert empty.util_sm == 0.0 and not empty.processes
    assert serve.sm_active == pytest.approx(
        expected_mean(scenario, 2, 0, T0 + 200, T0 + 201), abs=5e-5
    )


def test_a_gpu_without_gpm_reads_as_before_and_counts_no_error() -> None:
    scenario = fleet(JOBS)
    reader, _, clock = reader_for(scenario)
    read(reader, clock, T0 + 50)
    clock.t = T0 + 51
    samples, stats = reader.read(T0 + 51)
    old = next(s for s in samples if s.gpu_uuid == scenario.gpus("n1")[3].uuid)
    assert old.util_sm is not None and old.util_sm > 0.7
    assert (old.sm_active, old.sm_occupancy, old.tensor_active, old.dram_active) == (None,) * 4
    assert not [call for call in stats.errors_by_call if call.startswith("nvmlGpm")]


def test_a_longer_interval_measures_its_mean_and_a_gap_measures_nothing() -> None:
    scenario = fleet([{**JOBS[0], "profile": "bursty"}])
    reader, _, clock = reader_for(scenario)
    uuid = scenario.gpus("n1")[0].uuid
    read(reader, clock, T0 + 300)
    four = read(reader, clock, T0 + 304)[uuid]  # a late tick widens the sample to 4 s
    assert four.interval_s == 4.0
    assert four.sm_active == pytest.approx(
        expected_mean(scenario, 0, None, T0 + 300, T0 + 304), abs=5e-5
    )
    after_gap = read(reader, clock, T0 + 400)[uuid]  # the agent stopped: a new start
    assert after_gap.util_sm is not None and after_gap.sm_active is None
    assert read(reader, clock, T0 + 401)[uuid].sm_active is not None


def test_a_failed_gpm_sample_gives_none_counts_it_and_the_next_interval_recovers() -> None:
    scenario = fleet(JOBS)
    reader, sim, clock = reader_for(scenario)
    uuid = scenario.gpus("n1")[0].uuid
    read(reader, clock, T0 + 10)
    sim.fail("nvmlGpmSampleGet", pynvml.NVML_ERROR_GPU_IS_LOST, uuid=uuid, times=1)
    clock.t = T0 + 11
    samples, stats = reader.read(T0 + 11)
    lost = next(s for s in samples if s.gpu_uuid == uuid)
    assert lost.sm_active is None and lost.util_sm is not None
    assert stats.errors_by_call["nvmlGpmSampleGet:GpuIsLost"] == 1
    assert read(reader, clock, T0 + 12)[uuid].sm_active is None  # no sample to start from
    assert read(reader, clock, T0 + 13)[uuid].sm_active is not None


def test_the_simulated_gpm_follows_nvml_h() -> None:
    scenario = fleet(JOBS)
    _, sim, _ = reader_for(scenario)
    gpu, old = SimHandle("n1", 0), SimHandle("n1", 3)
    assert sim.nvmlGpmQueryDeviceSupport(gpu).isSupportedDevice == 1
    assert sim.nvmlGpmQueryDeviceSupport(old).isSupportedDevice == 0
    first, second = sim.nvmlGpmSampleAlloc(), sim.nvmlGpmSampleAlloc()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        sim.nvmlGpmSampleGet(old, first)
    with pytest.raises(pynvml.NVMLError_NotFound):  # no GPU instance 9 on the MIG GPU
        sim.nvmlGpmMigSampleGet(SimHandle("n1", 2), 9, first)
    sim.nvmlGpmSampleGet(gpu, first)
    sim.nvmlGpmMigSampleGet(SimHandle("n1", 2), 1, second)
    request = pynvml.c_nvmlGpmMetricsGet_t()
    request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = 1
    request.sample1, request.sample2 = first, second
    request.metrics[0].metricId = pynvml.NVML_GPM_METRIC_SM_UTIL
    with pytest.raises(pynvml.NVMLError_InvalidArgument):  # samples of two devices
        sim.nvmlGpmMetricsGet(request)
    request.version = 99
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        sim.nvmlGpmMetricsGet(request)
    sim.nvmlGpmSampleFree(first)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlGpmSampleFree(first)
