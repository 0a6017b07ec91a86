"""The live loop's encoding: batches written straight from the samples, byte for byte what the
pydantic models give."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuledger.agents.nvml import _with_measures
from gpuledger.agents.publisher import encode, encode_samples
from gpuledger.agents.runner import DEMO_SCENARIO, AgentCore
from gpuledger.agents.sim.engine import Scenario
from gpuledger.schema.messages import (
    EPOCH_MAX_S,
    UINT32_MAX,
    UINT64_MAX,
    GpuSample,
    JobType,
    ProcessLabels,
    ProcessSample,
    SampleBatch,
)

T0 = 1_700_000_000.0


def via_models(node: str, samples: list[GpuSample]) -> bytes:
    """How batches were encoded before: dumped to dicts, validated again, written."""
    return encode(SampleBatch(node=node, samples=[s.model_dump(mode="json") for s in samples]))


# Label values with what gets normalised away (control characters) and what JSON escapes.
labels_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40
) | st.sampled_from(["", '"quoted"', "back\\slash", "tab\there", "\x00\x1f\x7f\x9f", "é😀"])
fractions = st.floats(min_value=0.0, max_value=1.0)


def maybe(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | values


@st.composite
def process_samples(draw: st.DrawFn) -> ProcessSample:
    labels = ProcessLabels(
        job_id=draw(maybe(labels_text)),
        team=draw(maybe(labels_text)),
        project=draw(maybe(labels_text)),
        job_type=draw(maybe(st.sampled_from(list(JobType)))),
        experiment_id=draw(maybe(labels_text)),
        model=draw(maybe(labels_text)),
        environment=draw(maybe(labels_text)),
    )
    return ProcessSample(
        pid=draw(st.integers(0, UINT32_MAX)),
        name=draw(labels_text),
        util_sm=draw(maybe(fractions)),
        mem_used_bytes=draw(st.integers(0, UINT64_MAX)),
        container_id=draw(maybe(labels_text)),
        pod_uid=draw(maybe(labels_text)),
        labels=labels,
    )


@st.composite
def gpu_samples(draw: st.DrawFn, node: str) -> GpuSample:
    values: dict[str, Any] = {
        "ts": draw(st.floats(min_value=0.0, max_value=EPOCH_MAX_S, exclude_max=True)),
        "node": node,
        "gpu_uuid": draw(st.text(min_size=1, max_size=128)),
        "gpu_index": draw(st.integers(0, UINT32_MAX)),
        "gpu_name": draw(st.text(max_size=60)),
        "mig_profile": draw(maybe(st.sampled_from(["1g.10gb", "3g.40gb", "1c.3g.20gb"]))),
        "interval_s": draw(st.floats(min_value=1e-6, max_value=3600.0)),
        "mem_used_bytes": draw(st.integers(0, UINT64_MAX)),
        "mem_total_bytes": draw(st.integers(0, UINT64_MAX)),
        "temp_c": draw(maybe(st.floats(allow_nan=False, allow_infinity=False))),
        "processes": draw(st.lists(process_samples(), max_size=4)),
    }
    for name in ("util_sm", "util_mem", "sm_active", "sm_occupancy", "tensor_active"):
        values[name] = draw(maybe(fractions))
    for name in ("power_w", "power_limit_w"):
        values[name] = draw(maybe(st.floats(min_value=0.0, max_value=1e12)))
    return GpuSample(**values)


@st.composite
def batches(draw: st.DrawFn) -> tuple[str, list[GpuSample]]:
    node = draw(st.text(max_size=64))
    return node, draw(st.lists(gpu_samples(node), max_size=5))


@settings(max_examples=300, deadline=None)
@given(batches())
def test_a_batch_written_from_its_samples_is_the_models_bytes(
    batch: tuple[str, list[GpuSample]],
) -> None:
    node, samples = batch
    assert encode_samples(node, samples) == via_models(node, samples)


@settings(max_examples=300, deadline=None)
@given(process_samples(), maybe(fractions), st.integers(0, UINT64_MAX))
def test_a_process_given_new_measures_is_what_validation_gives(
    known: ProcessSample, util: float | None, used: int
) -> None:
    fresh = _with_measures(known, util, used)
    validated = ProcessSample.model_validate(
        {**known.__dict__, "util_sm": util, "mem_used_bytes": used}
    )
    assert fresh == validated
    assert fresh.model_fields_set == validated.model_fields_set
    assert encode(fresh) == encode(validated)


def test_the_live_loops_records_are_the_generated_records_encoded() -> None:
    def core() -> AgentCore:
        scenario = Scenario.load(DEMO_SCENARIO, origin=T0)
        built = AgentCore.simulated(scenario)
        built.start(T0)
        return built

    modelled, encoded = core(), core()
    samples = 0
    for k in range(1, 91):
        records, _ = modelled.step(T0 + k - 1, T0 + k)
        expected = [
            (topic, key, encode(message), len(getattr(message, "samples", ())))
            for topic, key, message in records
        ]
        got, _ = encoded.step_encoded(T0 + k - 1, T0 + k)
        assert got == expected
        samples += sum(count for _, _, _, count in got)
    assert samples > 0
