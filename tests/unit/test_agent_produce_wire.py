"""The agent producer's own Produce frames and answers, byte for byte against kafka-python's
encoding of the same request and its decoding of the same answer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.protocol.producer import ProduceRequest, ProduceResponse

from gpuledger.agents.producer import (
    PRODUCE_MAX_VERSION,
    produce_answer,
    produce_frame,
    produce_head,
    produce_request,
)

INT32 = st.integers(0, 2**31 - 1)
names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=60
)
versions = st.integers(3, PRODUCE_MAX_VERSION)


@settings(max_examples=300, deadline=None)
@given(names, INT32, versions, names, INT32, INT32, st.binary(max_size=300))
def test_a_frame_is_what_kafka_python_encodes(
    topic: str,
    partition: int,
    version: int,
    client_id: str,
    timeout_ms: int,
    corr: int,
    records: bytes,
) -> None:
    head = produce_head(topic, partition, version, client_id, timeout_ms)
    whole = produce_request(topic, partition, timeout_ms, records)  # records and all
    whole.with_header(correlation_id=corr, client_id=client_id)
    frame = produce_frame(head, corr, records)
    assert frame == whole.encode(version=version, header=True, framed=True)
    read = ProduceRequest.decode(frame[4:], version=version, header=True)
    assert (read.header.correlation_id, read.header.client_id) == (corr, client_id)
    assert (read.acks, read.timeout_ms, read.transactional_id) == (-1, timeout_ms, None)
    (data,) = read.topic_data
    (part,) = data.partition_data
    assert (data.name, part.index, bytes(part.records)) == (topic, partition, records)


@settings(max_examples=300, deadline=None)
@given(
    names,
    INT32,
    st.integers(-1, 120),
    st.integers(-1, 2**63 - 1),
    versions,
    INT32,
    st.lists(st.tuples(INT32, st.none() | names), max_size=3),
    st.none() | names,
)
def test_an_answer_reads_as_kafka_python_decodes_it(
    topic: str,
    partition: int,
    code: int,
    offset: int,
    version: int,
    corr: int,
    record_errors: list[tuple[int, str | None]],
    message: str | None,
) -> None:
    answer_type = ProduceResponse.TopicProduceResponse
    entry = answer_type.PartitionProduceResponse
    errors = [
        entry.BatchIndexAndErrorMessage(batch_index=i, batch_index_error_message=m)
        for i, m in record_errors
    ]
    answer = ProduceResponse(
        responses=[
            answer_type(
                name=topic,
                partition_responses=[
                    entry(
                        index=partition,
                        error_code=code,
                        base_offset=offset,
                        log_append_time_ms=-1,
                        log_start_offset=0,
                        record_errors=errors,
                        error_message=message,
                    )
                ],
            )
        ],
        throttle_time_ms=0,
        version=version,
    )
    answer.with_header(correlation_id=corr)
    body = bytes(answer.encode(header=True))
    decoded = ProduceResponse.decode(body, version=version, header=True)
    expected = decoded.responses[0].partition_responses[0]
    assert produce_answer(body, corr) == (expected.index, expected.error_code)
    with pytest.raises(ValueError, match="expected"):
        produce_answer(body, corr + 1)


def test_versions_with_tagged_fields_or_without_producer_ids_are_refused() -> None:
    for version in (2, PRODUCE_MAX_VERSION + 1):
        with pytest.raises(ValueError, match="only v3 to v8"):
            produce_head("t", 0, version, "agent", 1000)
