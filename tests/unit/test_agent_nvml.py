"""The NVML reader over the simulated NVML: what a node's agent puts in its samples."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pynvml
import pytest

from gpuledger.agents.attribution import ProcessAttribution
from gpuledger.agents.nvml import NvmlReader
from gpuledger.agents.sim.engine import Scenario
from gpuledger.agents.sim.nvml import SimHandle, SimulatedNvml
from gpuledger.schema.messages import GpuSample, ProcessLabels, ProcessSample

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def node(jobs: list[dict[str, Any]], gpus: list[dict[str, Any]] | None = None) -> Scenario:
    return Scenario.from_dict(
        {
            "scenario": {"seed": 11},
            "nodes": [
                {
                    "name": "n1",
                    "gpus": gpus
                    or [
                        {"name": "NVIDIA H100 80GB HBM3", "count": 2},
                        {"name": "NVIDIA A100-SXM4-80GB", "mig": ["3g.40gb", "2g.20gb", "1g.10gb"]},
                    ],
                }
            ],
            "jobs": jobs,
        },
        origin=T0,
    )


TRAIN = {"job_id": "train", "node": "n1", "gpus": [0], "team": "research", "mem_gb": 40}


def reader_for(scenario: Scenario, t: float = T0 + 100) -> tuple[NvmlReader, SimulatedNvml, Clock]:
    clock = Clock(t)
    sim = SimulatedNvml(scenario, "n1", clock)
    reader = NvmlReader(sim, "n1", clock, attribute=sim.attribute)
    reader.init()
    return reader, sim, clock


def read_at(reader: NvmlReader, clock: Clock, t: float) -> list[GpuSample]:
    clock.t = t
    samples, _ = reader.read(t)
    return samples


def by_uuid(samples: list[GpuSample]) -> dict[str, GpuSample]:
    return {s.gpu_uuid: s for s in samples}


def test_sample_reports_nvml_values_in_fractions_watts_and_bytes() -> None:
    scenario = node([TRAIN])
    reader, _, clock = reader_for(scenario)
    samples = read_at(reader, clock, T0 + 100)
    truth = scenario.hardware("n1", T0 + 100).gpus[0]
    sample = by_uuid(samples)[truth.gpu.uuid]
    assert sample.ts == T0 + 99 and sample.interval_s == 1.0
    assert sample.node == "n1" and sample.gpu_index == 0
    assert sample.gpu_name == "NVIDIA H100 80GB HBM3" and sample.mig_profile is None
    assert sample.util_sm == round(100 * truth.util_gpu) / 100
    assert sample.util_mem == round(100 * truth.util_mem) / 100
    assert sample.mem_used_bytes == 40 * 1024**3
    assert sample.mem_total_bytes == 81559 * 1024**2
    assert sample.power_w == round(truth.power_w * 1000) / 1000
    assert sample.power_limit_w == 700.0
    assert sample.temp_c == truth.temp_c
    (process,) = sample.processes
    assert process.name == "python" and process.mem_used_bytes == 40 * 1024**3
    assert process.labels.job_id == "train" and process.labels.team == "research"
    assert 0.8 < (process.util_sm or 0) <= 1.0


def test_mig_instances_are_sampled_with_their_own_uuid_profile_and_no_utilization() -> None:
    scenario = node(
        [
            {"job_id": "serve", "node": "n1", "gpus": [2], "mig_instance": 0, "mem_gb": 20},
            {"job_id": "eval", "node": "n1", "gpus": [2], "mig_instance": 2, "mem_gb": 5},
        ]
    )
    reader, _, clock = reader_for(scenario)
    clock.t = T0 + 100
    samples, stats = reader.read(T0 + 100)
    gpu = scenario.gpus("n1")[2]
    migs = [s for s in samples if s.mig_profile is not None]
    assert [s.gpu_uuid for s in migs] == [m.uuid for m in gpu.mig]
    assert gpu.uuid not in by_uuid(samples)  # the parent would bill the GPU twice
    assert [s.mig_profile for s in migs] == ["3g.40gb", "2g.20gb", "1g.10gb"]
    assert {s.gpu_name for s in migs} == {"NVIDIA A100-SXM4-80GB"}
    assert {s.gpu_index for s in migs} == {2}
    assert all(s.util_sm is None and s.util_mem is None for s in migs)
    assert all(s.power_w is None and s.temp_c is None for s in migs)
    assert [s.mem_total_bytes // 2**20 for s in migs] == [40448, 19968, 9728]
    serve, empty, evaluation = migs
    assert [p.labels.job_id for p in serve.processes] == ["serve"]
    assert serve.processes[0].util_sm is None  # NVML has no per-process utilization in MIG mode
    assert empty.processes == []
    assert [p.labels.job_id for p in evaluation.processes] == ["eval"]
    assert stats.mig_instances == 3 and stats.gpus == 2
    assert stats.errors_by_call["nvmlDeviceGetUtilizationRates:NotSupported"] == 3


def test_mig_mode_without_instances_reports_the_whole_gpu() -> None:
    scenario = node([], gpus=[{"name": "NVIDIA A100-SXM4-80GB", "mig": []}])
    reader, _, clock = reader_for(scenario)
    (sample,) = read_at(reader, clock, T0 + 10)
    assert sample.gpu_uuid == scenario.gpus("n1")[0].uuid
    assert sample.mig_profile is None and sample.util_sm is None  # MIG on: no device utilization
    assert sample.power_w is not None


def test_unsupported_fields_become_none_and_are_counted_by_error_and_call() -> None:
    scenario = node([TRAIN])
    reader, sim, clock = reader_for(scenario)
    sim.fail("nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_NOT_SUPPORTED)
    sim.fail("nvmlDeviceGetTemperature", pynvml.NVML_ERROR_NOT_SUPPORTED)
    clock.t = T0 + 50
    samples, stats = reader.read(T0 + 50)
    plain = [s for s in samples if s.mig_profile is None]
    assert len(plain) == 2
    assert all(s.power_w is None and s.temp_c is None for s in plain)
    assert all(s.util_sm is not None and s.power_limit_w == 700.0 for s in plain)
    # two plain GPUs and three MIG instances asked, all unsupported
    assert stats.errors_by_call["nvmlDeviceGetPowerUsage:NotSupported"] == 2 + 3
    assert stats.errors["NotSupported"] >= 10


def test_missing_driver_function_falls_back_or_gives_none_never_raises() -> None:
    scenario = node([TRAIN])
    reader, sim, clock = reader_for(scenario)
    sim.remove_function("nvmlDeviceGetEnforcedPowerLimit")
    sim.remove_function("nvmlDeviceGetProcessUtilization")
    clock.t = T0 + 50
    samples, stats = reader.read(T0 + 50)
    sample = by_uuid(samples)[scenario.gpus("n1")[0].uuid]
    assert sample.power_limit_w == 700.0  # from nvmlDeviceGetPowerManagementLimit
    assert sample.processes[0].util_sm is None
    # asked of two GPUs and three MIG instances
    assert stats.errors_by_call["nvmlDeviceGetEnforcedPowerLimit:FunctionNotFound"] == 5
    assert stats.errors["FunctionNotFound"] >= 3


def test_a_lost_gpu_is_skipped_and_the_others_still_report() -> None:
    scenario = node([TRAIN])
    reader, sim, clock = reader_for(scenario)
    lost = scenario.gpus("n1")[1].uuid
    sim.fail("nvmlDeviceGetUUID", pynvml.NVML_ERROR_GPU_IS_LOST, uuid=lost)
    clock.t = T0 + 50
    samples, stats = reader.read(T0 + 50)
    assert lost not in by_uuid(samples)
    assert scenario.gpus("n1")[0].uuid in by_uuid(samples)
    assert stats.skipped_devices == 1 and stats.errors["GpuIsLost"] == 1


def test_a_gpu_lost_mid_read_still_sends_a_sample_with_what_was_read() -> None:
    scenario = node([TRAIN])
    reader, sim, clock = reader_for(scenario)
    uuid = scenario.gpus("n1")[0].uuid
    for call in (
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetPowerUsage",
    ):
        sim.fail(call, pynvml.NVML_ERROR_GPU_IS_LOST, uuid=uuid, times=1)
    first = by_uuid(read_at(reader, clock, T0 + 50))[uuid]
    assert (first.util_sm, first.power_w, first.mem_total_bytes) == (None, None, 0)
    second = by_uuid(read_at(reader, clock, T0 + 51))[uuid]
    assert second.util_sm is not None and second.mem_total_bytes > 0


def test_process_that_exits_before_its_utilization_is_read_keeps_memory_loses_labels() -> None:
    scenario = node([{**TRAIN, "processes": [{"name": "trainer", "pid": 4242}]}])
    reader, sim, clock = reader_for(scenario)

    def exit_between_calls(function: str, handle: SimHandle | None) -> None:
        if function == "nvmlDeviceGetProcessUtilization":
            sim.kill(4242)

    sim.before_call = exit_between_calls
    clock.t = T0 + 50
    samples, stats = reader.read(T0 + 50)
    (process,) = by_uuid(samples)[scenario.gpus("n1")[0].uuid].processes
    assert process.pid == 4242 and process.mem_used_bytes == 40 * 1024**3
    assert process.util_sm is None  # busy GPU, no sample for it: unknown, not zero
    assert process.name == "" and process.labels.job_id is None
    assert stats.errors_by_call["nvmlDeviceGetProcessUtilization:NotFound"] == 1
    assert stats.errors_by_call["nvmlSystemGetProcessName:NotFound"] == 1


def test_idle_process_without_utilization_samples_is_idle_not_unknown() -> None:
    scenario = node(
        [
            {**TRAIN, "processes": [{"name": "trainer", "pid": 100}]},
            {
                "job_id": "nb",
                "node": "n1",
                "gpus": [0],
                "profile": "idle",
                "processes": [{"name": "kernel", "pid": 200}],
            },
            {
                "job_id": "nb2",
                "node": "n1",
                "gpus": [1],
                "profile": "idle",
                "processes": [{"name": "kernel", "pid": 300}],
            },
        ]
    )
    reader, _, clock = reader_for(scenario)

    def quiet(second: int) -> bool:  # neither idle kernel blipped during this second
        gpus = scenario.hardware("n1", T0 + second).gpus
        return gpus[1].util_gpu == 0.0 and gpus[0].processes[1].sm_util == 0.0

    t = T0 + next(s for s in range(40, 400) if quiet(s))
    samples = by_uuid(read_at(reader, clock, t))
    shared = samples[scenario.gpus("n1")[0].uuid]
    utils = {p.pid: p.util_sm for p in shared.processes}
    assert utils[200] == 0.0 and (utils[100] or 0) > 0.5  # NVML lists only busy processes
    alone = samples[scenario.gpus("n1")[1].uuid]
    assert alone.util_sm == 0.0 and alone.processes[0].util_sm == 0.0


def test_per_process_utilization_covers_each_interval_exactly_once() -> None:
    scenario = node([{**TRAIN, "profile": "bursty"}])
    reader, _, clock = reader_for(scenario)
    uuid = scenario.gpus("n1")[0].uuid
    seen: list[float] = []
    for t in (T0 + 100, T0 + 101, T0 + 102, T0 + 105, T0 + 106):
        previous = seen[-1] if seen else t - 1
        sample = by_uuid(read_at(reader, clock, t))[uuid]
        # what the driver sampled in this sample's own interval, and nothing else
        window = scenario.process_utilization("n1", 0, previous, t)
        expected = sum(s.sm_util for s in window) / len(window) / 100
        assert sample.ts == previous and sample.interval_s == t - previous
        assert sample.processes[0].util_sm == pytest.approx(expected)
        seen.append(t)


def test_repeated_read_reports_nothing_and_a_late_tick_widens_the_sample() -> None:
    scenario = node([TRAIN])
    reader, _, clock = reader_for(scenario)
    assert read_at(reader, clock, T0 + 100)
    clock.t = T0 + 100
    again, stats = reader.read(T0 + 100)
    assert again == [] and stats.repeated
    late = read_at(reader, clock, T0 + 103)
    assert {(s.ts, s.interval_s) for s in late} == {(T0 + 100, 3.0)}
    # after a long silence the agent starts afresh instead of claiming the whole gap
    after_gap = read_at(reader, clock, T0 + 400)
    assert {(s.ts, s.interval_s) for s in after_gap} == {(T0 + 399, 1.0)}


def test_first_read_does_not_average_the_drivers_whole_buffer() -> None:
    scenario = node([{**TRAIN, "profile": "bursty"}])
    reader, _, clock = reader_for(scenario)
    sample = by_uuid(read_at(reader, clock, T0 + 200))[scenario.gpus("n1")[0].uuid]
    window = scenario.process_utilization("n1", 0, T0 + 199, T0 + 200)
    assert len(window) == 2
    assert sample.processes[0].util_sm == pytest.approx(sum(s.sm_util for s in window) / 200)


def test_reader_takes_the_real_pynvml_module_and_reports_a_missing_library() -> None:
    reader = NvmlReader(pynvml, "here")
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        reader.init()


def test_an_unchanged_process_keeps_its_sample_and_any_change_makes_a_new_one() -> None:
    scenario = node(
        [
            {**TRAIN, "profile": "bursty", "processes": [{"name": "trainer", "pid": 100}]},
            {"job_id": "nb", "node": "n1", "gpus": [1], "profile": "idle",
             "processes": [{"name": "kernel", "pid": 300}, {"name": "kernel", "pid": 301}]},
        ]
    )  # fmt: skip
    readers = []
    for _ in range(2):
        reader, sim, clock = reader_for(scenario)
        known: dict[int, ProcessAttribution] = {}

        # attribution cached per process, as ProcAttributor does on a node
        def attribute(
            pid: int, sim: Any = sim, known: dict[int, ProcessAttribution] = known
        ) -> ProcessAttribution:
            return known.setdefault(pid, sim.attribute(pid))

        reader.attribute = attribute
        readers.append((reader, clock, known))
    (reusing, clock, known), (fresh, fresh_clock, _) = readers
    previous: dict[int, ProcessSample] = {}
    reused = renewed = 0
    for t in range(100, 130):
        if t == 120:  # the job's labels change (a pod relabelled): a new attribution
            known[300] = replace(known[300], labels=ProcessLabels(job_id="relabelled"))
            fresh.attribute = reusing.attribute
        fresh._processes.clear()  # the reference validates every process every time
        got = [p for s in read_at(reusing, clock, T0 + t) for p in s.processes]
        expected = [p for s in read_at(fresh, fresh_clock, T0 + t) for p in s.processes]
        assert got == expected
        for process in got:
            before = previous.get(process.pid)
            if before is not None and before is process:
                reused += 1
            elif before is not None:
                renewed += 1
                assert before != process
            previous[process.pid] = process
        if t >= 120:
            assert previous[300].labels.job_id == "relabelled"
    assert reused and renewed
