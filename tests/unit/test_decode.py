"""The fast sample decoder (streams/decode.py) against pydantic, the contract: it takes only
what pydantic takes, with the same values, and leaves everything else to pydantic."""

from __future__ import annotations

import json
import math
import typing
from typing import Any

import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from gpuledger.schema.messages import GpuSample, ProcessLabels, ProcessSample, SampleBatch
from gpuledger.streams.decode import (
    GpuSampleStruct,
    MirrorError,
    SampleDecoder,
    _Generator,
    _plain_enough,
    _SampleBatchChecked,
    sample_payloads,
)

DECODER = SampleDecoder()


def pydantic_decode(value: bytes) -> tuple[bool, list[GpuSample | None]]:
    """(batch valid, each sample or None where pydantic refuses it)."""
    try:
        batch = SampleBatch.model_validate_json(value)
    except ValidationError:
        return False, []
    out: list[GpuSample | None] = []
    for raw in batch.samples:
        try:
            out.append(GpuSample.model_validate(raw))
        except ValidationError:
            out.append(None)
    return True, out


def same_sample(fast: Any, slow: GpuSample) -> bool:
    """Equal values, types included (1 is not 1.0 here), read the way the cost model reads."""
    left = msgspec.to_builtins(fast)
    right = slow.model_dump(mode="json")
    return json.dumps(left, sort_keys=True) == json.dumps(right, sort_keys=True)


# --- the structs mirror the models --------------------------------------------------------


@pytest.mark.parametrize("model", [GpuSample, ProcessSample, ProcessLabels])
def test_each_struct_has_the_models_fields_defaults_and_order(model: type[BaseModel]) -> None:
    struct = _Generator().struct(model)
    fields = msgspec.structs.fields(struct)
    assert [f.name for f in fields] == list(model.model_fields)
    for f in fields:
        info = model.model_fields[f.name]
        if info.default is PydanticUndefined:
            assert f.required, f.name
        elif isinstance(info.default, BaseModel):
            default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
            assert msgspec.to_builtins(default) == info.default.model_dump(mode="json")
        else:
            default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
            assert default == info.default, f.name


def test_a_validator_the_decoder_does_not_mirror_stops_it_at_import() -> None:
    from pydantic import field_validator

    class Stricter(GpuSample):
        @field_validator("node")
        @classmethod
        def _no_spaces(cls, value: str) -> str:
            if " " in value:
                raise ValueError("node must not contain spaces")
            return value

    with pytest.raises(MirrorError, match="_no_spaces"):
        _Generator().struct(Stricter)


# --- valid messages: the same values -------------------------------------------------------

GiB = 1024**3
text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
# Label values the normaliser leaves as they are (no control characters): the fast path's.
label_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=12)
fractions = st.floats(0.0, 1.0) | st.sampled_from([0, 1])
labels = st.fixed_dictionaries(
    {},
    optional={
        "job_id": st.none() | label_text,
        "team": st.none() | label_text,
        "project": st.none() | label_text,
        "job_type": st.none() | st.sampled_from(["training", "inference", "notebook", "other"]),
        "experiment_id": st.none() | label_text,
    },
)
process = st.fixed_dictionaries(
    {"pid": st.integers(0, 2**31)},
    optional={
        "name": label_text,
        "util_sm": st.none() | fractions,
        "mem_used_bytes": st.integers(0, 2**40),
        "container_id": st.none() | label_text,
        "pod_uid": st.none() | label_text,
        "labels": labels,
    },
)
valid_sample = st.fixed_dictionaries(
    {
        "ts": st.floats(0.0, 2e9) | st.integers(0, 2_000_000_000),
        "node": text,
        "gpu_uuid": text.filter(bool),
        "gpu_name": st.sampled_from(["NVIDIA H100 80GB HBM3", "NVIDIA L4", "Tesla T4"]),
    },
    optional={
        "v": st.just(1),
        "gpu_index": st.integers(0, 16),
        "mig_profile": st.none() | st.sampled_from(["1g.10gb", "3g.40gb"]),
        "interval_s": st.floats(1e-3, 3600.0) | st.sampled_from([1, 60]),
        "util_sm": st.none() | fractions,
        "util_mem": st.none() | fractions,
        "mem_used_bytes": st.integers(0, 80 * GiB),
        "mem_total_bytes": st.integers(0, 80 * GiB),
        "power_w": st.none() | st.floats(0.0, 1500.0),
        "power_limit_w": st.none() | st.floats(0.0, 1500.0),
        "temp_c": st.none() | st.floats(-40.0, 120.0) | st.integers(-40, 120),
        "processes": st.lists(process, max_size=4),
        "from_a_newer_agent": st.integers(),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(valid_sample, max_size=8), text)
def test_a_valid_batch_decodes_fast_to_exactly_what_pydantic_makes_of_it(
    samples: list[dict[str, Any]], node: str
) -> None:
    value = json.dumps({"v": 1, "node": node, "samples": samples}).encode()
    fast = DECODER.decode(value)
    ok, slow = pydantic_decode(value)
    assert ok and all(s is not None for s in slow)
    assert fast is not None, "a valid batch must take the fast path"
    assert len(fast) == len(slow)
    for f, s in zip(fast, slow, strict=True):
        assert s is not None and same_sample(f, s)
        # What samples_raw keeps of it reads back as the same sample.
        (payload,) = sample_payloads([f])
        assert GpuSample.model_validate_json(payload) == s


# --- anything at all: fast says yes only where pydantic does -------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300)
    | st.sampled_from(["1.5", "0", "training", "", "x" * 257, "é" * 256, "\U0001f600" * 129])
    | st.sampled_from(["a\x00b", "\x1b[31mred", "tab\there", "\x85", "\x7f" * 300])
    | st.sampled_from([2**63, 2**64 - 1, 2**64, -(2**63), 1e308, -1e308, 4_102_444_800])
)


def mutate(base: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    """Mostly a valid object, sometimes with a field replaced by anything, now and then
    anything at all."""

    @st.composite
    def mutated(draw: st.DrawFn) -> Any:
        kind = draw(st.sampled_from(["valid", "valid", "valid", "field", "field", "anything"]))
        if kind == "anything":
            return draw(json_scalars)
        obj = dict(draw(base))
        if kind == "field":
            key = draw(st.sampled_from([*obj, "v", "ts", "util_sm", "pid", "labels"]))
            obj[key] = draw(json_scalars)
        return obj

    return mutated()


any_process = mutate(process)
any_sample = mutate(
    valid_sample.flatmap(
        lambda s: st.lists(any_process, max_size=2).map(lambda ps: {**s, "processes": ps})
    )
)


@settings(max_examples=800, deadline=None)
@given(
    st.lists(any_sample, max_size=3),
    st.one_of(text, text, json_scalars),
    st.one_of(st.just(1), st.just(1), json_scalars),
)
def test_the_fast_decoder_accepts_only_what_pydantic_accepts_with_the_same_values(
    samples: list[Any], node: Any, version: Any
) -> None:
    batch: dict[str, Any] = {"node": node, "samples": samples}
    if version is not None:
        batch["v"] = version
    value = json.dumps(batch).encode()
    fast = DECODER.decode(value)
    ok, slow = pydantic_decode(value)
    event("fast path" if fast is not None else "pydantic path")
    if fast is None:
        return  # pydantic decides: the worker dead-letters what it refuses
    assert ok, "fast accepted a batch that pydantic refuses"
    assert len(fast) == len(slow)
    for f, s in zip(fast, slow, strict=True):
        assert s is not None, "fast accepted a sample that pydantic refuses"
        assert same_sample(f, s)


# Agents write raw UTF-8, not `\u` escapes: DEL and C1 control characters arrive raw, and
# messages without a backslash skip the patterns (`_plain_enough`). Whatever the route, the
# decoder decides what the checked mirror alone decides, with the same values.
control_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"])
    | st.sampled_from(["\x7f", "\x80", "\x85", "\x9f", "\xa0", "\xc2", "é", "\\"]),
    max_size=12,
)
raw_labels = st.fixed_dictionaries({}, optional={"job_id": control_text, "team": control_text})
raw_sample = valid_sample.flatmap(
    lambda s: st.tuples(control_text, control_text, raw_labels).map(
        lambda extra: {
            **s,
            "node": extra[0],
            "processes": [{"pid": 1, "name": extra[1], "labels": extra[2]}],
        }
    )
)
CHECKED = msgspec.json.Decoder(_SampleBatchChecked)


@settings(max_examples=500, deadline=None)
@given(st.lists(raw_sample, min_size=1, max_size=3), control_text)
def test_raw_utf8_messages_decode_as_the_checked_mirror_decides(
    samples: list[dict[str, Any]], node: str
) -> None:
    value = json.dumps({"v": 1, "node": node, "samples": samples}, ensure_ascii=False).encode()
    event("plain" if _plain_enough(value) else "checked")
    fast = DECODER.decode(value)
    try:
        checked = CHECKED.decode(value).samples  # type: ignore[attr-defined]
    except msgspec.ValidationError:
        assert fast is None
        return
    assert fast is not None
    assert msgspec.to_builtins(fast) == msgspec.to_builtins(checked)
    ok, slow = pydantic_decode(value)
    assert ok and all(s is not None and same_sample(f, s) for f, s in zip(fast, slow, strict=True))


@pytest.mark.parametrize(
    "value",
    [
        None,  # a tombstone
        b"",
        b"not json",
        b"[]",
        b'{"v": 1, "node": "n", "samples": [1]}',
        b'{"v": 1, "node": "n", "samples": [{"ts": 1.0}]}',  # required fields missing
        b'{"v": 2, "node": "n", "samples": []}',  # a schema version this worker does not know
        b'{"v": 1, "node": "n", "samples": [{"ts": 1e999, "node": "n", "gpu_uuid": "g", '
        b'"gpu_name": "x"}]}',
        b'{"v": 1, "node": "n", "samples": [{"ts": -1, "node": "n", "gpu_uuid": "g", '
        b'"gpu_name": "x"}]}',
        b'{"v": 1, "node": "n", "samples": [{"ts": 1, "node": "\\ud800", "gpu_uuid": "g", '
        b'"gpu_name": "x"}]}',
        # Beyond the contract's bounds: times past 2100, infinite floats, counts past UInt64.
        b'{"v": 1, "node": "n", "samples": [{"ts": 9.3e15, "node": "n", "gpu_uuid": "g", '
        b'"gpu_name": "x"}]}',
        b'{"v": 1, "node": "n", "samples": [{"ts": 1, "node": "n", "gpu_uuid": "g", '
        b'"gpu_name": "x", "temp_c": 1e999}]}',
        b'{"v": 1, "node": "n", "samples": [{"ts": 1, "node": "n", "gpu_uuid": "g", '
        b'"gpu_name": "x", "temp_c": NaN}]}',
        b'{"v": 1, "node": "n", "samples": [{"ts": 1, "node": "n", "gpu_uuid": "g", '
        b'"gpu_name": "x", "mem_used_bytes": 18446744073709551616}]}',
        # A label the normaliser changes: pydantic normalises (and counts) it.
        b'{"v": 1, "node": "n", "samples": [{"ts": 1, "node": "n", "gpu_uuid": "g", '
        b'"gpu_name": "x", "processes": [{"pid": 1, "labels": {"team": "a\\u0000b"}}]}]}',
    ],
)
def test_what_the_fast_decoder_refuses_goes_to_pydantic(value: bytes | None) -> None:
    assert DECODER.decode(value) is None


def test_a_repeated_key_keeps_the_last_value_as_pydantic_does() -> None:
    value = (
        b'{"v": 1, "node": "n", "samples": [{"ts": 5, "ts": 7, "node": "n", '
        b'"gpu_uuid": "g", "gpu_name": "x", "util_sm": 0.5, "util_sm": 0.25}]}'
    )
    (fast,) = DECODER.decode(value) or []
    _, (slow,) = pydantic_decode(value)
    assert slow is not None and same_sample(fast, slow)
    assert (fast.ts, fast.util_sm) == (7.0, 0.25)


def test_a_decoded_sample_reads_like_a_gpu_sample() -> None:
    value = json.dumps(
        {
            "v": 1,
            "node": "n",
            "samples": [
                {
                    "ts": 10,
                    "node": "n",
                    "gpu_uuid": "g",
                    "gpu_name": "x",
                    "processes": [{"pid": 1, "labels": {"job_type": "training"}}],
                }
            ],
        }
    ).encode()
    (decoded,) = DECODER.decode(value) or []
    assert type(decoded) is GpuSampleStruct
    fast: Any = decoded
    annotations = typing.get_type_hints(GpuSample)
    for name in GpuSample.model_fields:
        assert hasattr(fast, name), name
    assert isinstance(fast.ts, float) and annotations["ts"] is float
    assert fast.processes[0].labels.job_type.value == "training"
    assert fast.interval_s == 1.0 and not math.isnan(fast.interval_s)


def test_a_label_ending_in_a_newline_is_left_to_pydantic_which_normalises_it() -> None:
    sample = {"ts": 1.0, "node": "n1", "gpu_uuid": "GPU-0", "gpu_name": "NVIDIA H100"}
    process = {"pid": 1, "name": "train\n", "labels": {"team": "vision\n"}}
    value = json.dumps({"v": 1, "node": "n1", "samples": [{**sample, "processes": [process]}]})
    assert DECODER.decode(value.encode()) is None  # the mirror refuses it: pydantic decides
    ok, slow = pydantic_decode(value.encode())
    assert ok and slow[0] is not None
    (decoded,) = slow[0].processes
    assert (decoded.name, decoded.labels.team) == ("train", "vision")


@settings(max_examples=500, deadline=None)
@given(st.one_of(any_sample, raw_sample), st.booleans())
def test_a_kept_sample_decodes_fast_only_where_pydantic_accepts_it_with_the_same_values(
    sample: Any, escaped: bool
) -> None:
    """What corrections read back from samples_raw: one sample's JSON, decoded as a message's
    samples are (None: the sink asks pydantic)."""
    value = json.dumps(sample, ensure_ascii=escaped).encode()
    fast = DECODER.decode_sample(value)
    try:
        slow: GpuSample | None = GpuSample.model_validate_json(value)
    except ValidationError:
        slow = None
    event("fast path" if fast is not None else "pydantic path")
    if fast is not None:
        assert slow is not None, "fast accepted a sample that pydantic refuses"
        assert same_sample(fast, slow)
