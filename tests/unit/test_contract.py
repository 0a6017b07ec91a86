"""The bounded contract of the messages (schema/messages.py): finite floats, times in the
stated window, counts within their columns, label values normalised and counted; and the
bounded quotes of the values refused."""

from __future__ import annotations

import base64
import time

import orjson
import pytest
from pydantic import BaseModel, ValidationError

from gpuledger.schema.messages import (
    EPOCH_MAX_S,
    LABEL_MAX_CHARS,
    LABEL_NORMALISATIONS,
    DeadLetter,
    GpuSample,
    JobEvent,
    NodeInfo,
    PriceEntry,
    ProcessLabels,
    SampleBatch,
    UsageEvent,
)
from gpuledger.schema.pricebook import PriceBookError, parse_price_book
from gpuledger.streams.deadletters import LETTER_MAX_BYTES, letter_value, validation_reason
from gpuledger.streams.decode import SampleDecoder

T0 = 1_767_225_600.0
NOT_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999"]

# (model, a valid message, its time fields)
TIMED: list[tuple[type[BaseModel], dict[str, object], list[str]]] = [
    (JobEvent, {"ts": T0, "job_id": "j"}, ["ts", "started_at", "ended_at"]),
    (
        PriceEntry,
        {
            "provider": "*",
            "region": "*",
            "gpu_model": "H100",
            "pricing_model": "on_demand",
            "usd_per_gpu_hour": 1.0,
        },
        ["effective_from"],
    ),
    (NodeInfo, {"ts": T0, "node": "n"}, ["ts"]),
    (UsageEvent, {"ts": T0, "job_id": "j"}, ["ts"]),
    (GpuSample, {"ts": T0, "node": "n", "gpu_uuid": "g", "gpu_name": "x"}, ["ts"]),
]


def _json(base: dict[str, object], name: str, token: bytes) -> bytes:
    return orjson.dumps({**base, name: "@"}).replace(b'"@"', token)


def _refusal(model: type[BaseModel], value: bytes) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate_json(value)
    return validation_reason(caught.value)


@pytest.mark.parametrize(
    ("model", "base", "names"), TIMED, ids=lambda x: getattr(x, "__name__", "")
)
def test_no_time_is_nan_infinite_or_out_of_the_window(
    model: type[BaseModel], base: dict[str, object], names: list[str]
) -> None:
    for name in names:
        model.model_validate_json(_json(base, name, repr(T0).encode()))  # the base is valid
        for token in NOT_FINITE:
            reason = _refusal(model, _json(base, name, token))
            assert reason.startswith(f"{name}: Input should be a finite number"), reason
        for token in [b"-1e308", b"-0.5"]:
            reason = _refusal(model, _json(base, name, token))
            assert "greater than or equal to 0" in reason, reason
        # Milliseconds, nanoseconds, past what a double holds to the millisecond, the bound.
        for token in [b"1767225600000", b"1.7e18", b"9.3e15", b"1e308", b"4102444800"]:
            reason = _refusal(model, _json(base, name, token))
            assert f"{name}: Input should be less than 4102444800" in reason, reason
        model.model_validate_json(_json(base, name, repr(EPOCH_MAX_S - 0.001).encode()))


def test_a_sample_past_the_window_is_refused_by_both_decoders() -> None:
    """It reached the joiner before, whose millisecond array overflowed."""
    sample = {"ts": 9.3e15, "node": "n", "gpu_uuid": "g", "gpu_name": "x"}
    value = orjson.dumps({"v": 1, "node": "n", "samples": [sample]})
    assert SampleDecoder().decode(value) is None
    (raw,) = SampleBatch.model_validate_json(value).samples
    with pytest.raises(ValidationError, match="less than 4102444800"):
        GpuSample.model_validate(raw)


@pytest.mark.parametrize(
    ("model", "base", "name", "token"),
    [
        (GpuSample, TIMED[4][1], "mem_used_bytes", b"18446744073709551616"),
        (GpuSample, TIMED[4][1], "gpu_index", b"4294967296"),
        (UsageEvent, TIMED[3][1], "requests", b"18446744073709551616"),
        (UsageEvent, TIMED[3][1], "tokens", b"-1"),
        (GpuSample, TIMED[4][1], "temp_c", b"NaN"),
        (GpuSample, TIMED[4][1], "power_w", b"Infinity"),
        (NodeInfo, TIMED[2][1], "usd_per_gpu_hour", b"1e999"),
        (PriceEntry, TIMED[1][1], "usd_per_gpu_hour", b"NaN"),
    ],
)
def test_counts_fit_their_columns_and_every_float_is_finite(
    model: type[BaseModel], base: dict[str, object], name: str, token: bytes
) -> None:
    reason = _refusal(model, _json(base, name, token))
    assert reason.startswith(f"{name}: "), reason


def test_the_largest_counts_the_columns_hold_are_taken() -> None:
    usage = UsageEvent.model_validate_json(_json(TIMED[3][1], "tokens", b"18446744073709551615"))
    assert usage.tokens == 2**64 - 1


def test_label_values_are_normalised_and_counted_never_refused() -> None:
    before = LABEL_NORMALISATIONS.count
    labels = ProcessLabels.model_validate(
        {"team": "vi\x00sion\x1b[0m", "project": "p" * 10_000, "job_id": "j\x85"}
    )
    assert (labels.team, labels.job_id) == ("vision[0m", "j")
    assert labels.project == "p" * LABEL_MAX_CHARS
    event = JobEvent.model_validate(
        {"ts": T0, "job_id": "job\x07-1", "team": "\x7fml", "labels": {"k\x00": "v\x9f"}}
    )
    assert (event.job_id, event.team, event.labels) == ("job-1", "ml", {"k": "v"})
    assert LABEL_NORMALISATIONS.count - before == 7
    clean = ProcessLabels(team="vision", project="é" * LABEL_MAX_CHARS)
    assert LABEL_NORMALISATIONS.count - before == 7  # nothing to normalise: not counted
    assert clean.team == "vision"


def test_a_job_id_of_control_characters_only_is_refused() -> None:
    with pytest.raises(ValidationError, match="job_id"):
        JobEvent.model_validate({"ts": T0, "job_id": "\x00\x01"})


def test_a_json_lines_price_book_refuses_infinity_and_nan() -> None:
    line = (
        '{"provider": "*", "region": "*", "gpu_model": "H100", "pricing_model": "on_demand", '
        '"usd_per_gpu_hour": %s}'
    )
    for token in ["Infinity", "NaN", "1e999"]:
        with pytest.raises(PriceBookError, match="usd_per_gpu_hour"):
            parse_price_book(line % token, "prices.jsonl")
    (entry,) = parse_price_book(line % "2.5", "prices.jsonl")
    assert entry.usd_per_gpu_hour == 2.5


def test_a_reason_quotes_a_bounded_prefix_of_a_huge_message() -> None:
    malformed = b'{"v": 1, "node": "' + b"x" * 400_000  # 400 KB, cut off
    started = time.perf_counter()
    reason = _refusal(SampleBatch, malformed)
    assert len(reason) < 400, reason
    assert "400,018 long" in reason and reason.startswith("message: Invalid JSON")
    assert time.perf_counter() - started < 1.0
    huge_field = orjson.dumps({"v": 1, "node": "y" * 500_000, "samples": []})
    reason = _refusal(SampleBatch, huge_field)
    assert len(reason) < 400 and "500,000 long" in reason, reason


def test_a_dead_letter_too_large_for_a_record_goes_to_the_topic_cut() -> None:
    value = b"z" * 2_000_000
    letter = DeadLetter(
        value_b64=base64.b64encode(value).decode(),
        error="node: too long",
        topic="t",
        partition=0,
        offset=5,
        ts=T0,
    )
    sent = letter_value(letter)
    assert len(sent) <= LETTER_MAX_BYTES
    cut = DeadLetter.model_validate_json(sent)
    assert value.startswith(base64.b64decode(cut.value_b64))
    assert "the deadletters table keeps it whole" in cut.error
    small = letter.model_copy(update={"value_b64": base64.b64encode(b"{").decode()})
    assert DeadLetter.model_validate_json(letter_value(small)) == small
