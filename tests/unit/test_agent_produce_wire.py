"""The agent producer's own Kafka wire format (`agents/kafka_wire.py`), byte for byte against
kafka-python's encoding of the same requests and record batches, and its decoding of the same
answers. kafka-python is the reference here; the agent does not import it."""

from __future__ import annotations

import struct

import kafka.errors as kafka_errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner.default import murmur2 as kafka_murmur2
from kafka.protocol.metadata import (
    ApiVersionsRequest,
    ApiVersionsResponse,
    MetadataRequest,
    MetadataResponse,
)
from kafka.protocol.producer import (
    InitProducerIdRequest,
    InitProducerIdResponse,
    ProduceRequest,
    ProduceResponse,
)
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from gpuledger.agents import kafka_wire as wire

INT16 = st.integers(-(2**15), 2**15 - 1)
INT32 = st.integers(0, 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=60
)
produce_versions = st.integers(3, wire.VERSIONS[wire.PRODUCE][1])
EXAMPLES = settings(max_examples=300, deadline=None)


def reference_frame(request: object, version: int, corr: int, client_id: str) -> bytes:
    request.with_header(correlation_id=corr, client_id=client_id)  # type: ignore[attr-defined]
    return bytes(request.encode(version=version, header=True, framed=True))  # type: ignore[attr-defined]


def encoded_answer(answer: object, corr: int) -> bytes:
    answer.with_header(correlation_id=corr)  # type: ignore[attr-defined]
    return bytes(answer.encode(header=True))  # type: ignore[attr-defined]


# -- Produce -----------------------------------------------------------------------------
def reference_produce(topic: str, partition: int, timeout_ms: int, records: bytes) -> object:
    topic_data = ProduceRequest.TopicProduceData
    return ProduceRequest(
        transactional_id=None,
        acks=-1,
        timeout_ms=timeout_ms,
        topic_data=[
            topic_data(
                name=topic,
                partition_data=[topic_data.PartitionProduceData(index=partition, records=records)],
            )
        ],
    )


@EXAMPLES
@given(names, INT32, produce_versions, names, INT32, INT32, st.binary(max_size=300))
def test_a_produce_frame_is_what_kafka_python_encodes(
    topic: str,
    partition: int,
    version: int,
    client_id: str,
    timeout_ms: int,
    corr: int,
    records: bytes,
) -> None:
    head = wire.produce_head(topic, partition, version, client_id, timeout_ms)
    frame = wire.produce_frame(head, corr, records)
    whole = reference_produce(topic, partition, timeout_ms, records)
    assert frame == reference_frame(whole, version, corr, client_id)
    read = ProduceRequest.decode(frame[4:], version=version, header=True)
    assert (read.header.correlation_id, read.header.client_id) == (corr, client_id)
    assert (read.acks, read.timeout_ms, read.transactional_id) == (-1, timeout_ms, None)
    (data,) = read.topic_data
    (part,) = data.partition_data
    assert (data.name, part.index, bytes(part.records)) == (topic, partition, records)


@EXAMPLES
@given(
    names,
    INT32,
    st.integers(-1, 120),
    st.integers(-1, 2**63 - 1),
    produce_versions,
    INT32,
    st.lists(st.tuples(INT32, st.none() | names), max_size=3),
    st.none() | names,
)
def test_a_produce_answer_reads_as_kafka_python_decodes_it(
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
    body = encoded_answer(answer, corr)
    decoded = ProduceResponse.decode(body, version=version, header=True)
    expected = decoded.responses[0].partition_responses[0]
    assert wire.produce_answer(body, corr) == (expected.index, expected.error_code)
    with pytest.raises(ValueError, match="expected"):
        wire.produce_answer(body, corr + 1)


def test_produce_versions_with_tagged_fields_or_without_producer_ids_are_refused() -> None:
    for version in (2, wire.VERSIONS[wire.PRODUCE][1] + 1):
        with pytest.raises(ValueError, match="only v3 to v8"):
            wire.produce_head("t", 0, version, "agent", 1000)


# -- ApiVersions, Metadata, InitProducerId -----------------------------------------------
@EXAMPLES
@given(names, INT32)
def test_an_api_versions_request_and_answer_match_kafka_python(client_id: str, corr: int) -> None:
    frame = wire.request_frame(wire.API_VERSIONS, 0, corr, client_id, b"")
    assert frame == reference_frame(ApiVersionsRequest(), 0, corr, client_id)


@EXAMPLES
@given(
    st.integers(-1, 120),
    st.dictionaries(st.integers(0, 80), st.tuples(st.integers(0, 5), st.integers(0, 15))),
    INT32,
)
def test_an_api_versions_answer_reads_as_kafka_python_decodes_it(
    code: int, ranges: dict[int, tuple[int, int]], corr: int
) -> None:
    entry = ApiVersionsResponse.ApiVersion
    answer = ApiVersionsResponse(
        error_code=code,
        api_keys=[
            entry(api_key=k, min_version=lo, max_version=hi) for k, (lo, hi) in ranges.items()
        ],
        version=0,
    )
    body = encoded_answer(answer, corr)
    decoded = ApiVersionsResponse.decode(body, version=0, header=True)
    read = wire.read_api_versions(wire.answer(body, corr, wire.API_VERSIONS, 0))
    assert read == (
        decoded.error_code,
        {a.api_key: (a.min_version, a.max_version) for a in decoded.api_keys},
    )


@EXAMPLES
@given(names, st.integers(*wire.VERSIONS[wire.METADATA]), names, INT32)
def test_a_metadata_request_is_what_kafka_python_encodes(
    topic: str, version: int, client_id: str, corr: int
) -> None:
    reference = MetadataRequest(
        topics=[MetadataRequest.MetadataRequestTopic(name=topic)],
        allow_auto_topic_creation=False,
    )
    frame = wire.request_frame(
        wire.METADATA, version, corr, client_id, wire.metadata_body(topic, version)
    )
    assert frame == reference_frame(reference, version, corr, client_id)


brokers = st.lists(st.tuples(INT32, names, st.integers(1, 65535), st.none() | names), max_size=4)
partitions = st.lists(
    st.tuples(st.integers(-1, 80), INT32, st.integers(-1, 9), st.lists(INT32, max_size=3)),
    max_size=5,
)


@EXAMPLES
@given(
    st.integers(*wire.VERSIONS[wire.METADATA]),
    brokers,
    st.dictionaries(names, st.tuples(st.integers(-1, 80), partitions), max_size=3),
    st.none() | names,
    INT32,
)
def test_a_metadata_answer_reads_as_kafka_python_decodes_it(
    version: int,
    nodes: list[tuple[int, str, int, str | None]],
    topics: dict[str, tuple[int, list[tuple[int, int, int, list[int]]]]],
    cluster_id: str | None,
    corr: int,
) -> None:
    topic_type = MetadataResponse.MetadataResponseTopic
    part_type = topic_type.MetadataResponsePartition
    answer = MetadataResponse(
        throttle_time_ms=7,
        brokers=[
            MetadataResponse.MetadataResponseBroker(node_id=n, host=h, port=p, rack=r)
            for n, h, p, r in nodes
        ],
        cluster_id=cluster_id,
        controller_id=1,
        topics=[
            topic_type(
                error_code=code,
                name=name,
                is_internal=False,
                partitions=[
                    part_type(
                        error_code=e,
                        partition_index=i,
                        leader_id=leader,
                        leader_epoch=3,
                        replica_nodes=replicas,
                        isr_nodes=replicas[:1],
                        offline_replicas=replicas[1:],
                    )
                    for e, i, leader, replicas in parts
                ],
            )
            for name, (code, parts) in topics.items()
        ],
        version=version,
    )
    body = encoded_answer(answer, corr)
    decoded = MetadataResponse.decode(body, version=version, header=True)
    read = wire.read_metadata(wire.answer(body, corr, wire.METADATA, version))
    assert read == (
        {b.node_id: (b.host, b.port) for b in decoded.brokers},
        {
            t.name: (
                t.error_code,
                [(p.partition_index, p.error_code, p.leader_id) for p in t.partitions],
            )
            for t in decoded.topics
        },
    )


@EXAMPLES
@given(st.integers(*wire.VERSIONS[wire.INIT_PRODUCER_ID]), names, INT32)
def test_an_init_producer_id_request_is_what_kafka_python_encodes(
    version: int, client_id: str, corr: int
) -> None:
    reference = InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=0)
    frame = wire.request_frame(
        wire.INIT_PRODUCER_ID, version, corr, client_id, wire.init_producer_id_body()
    )
    assert frame == reference_frame(reference, version, corr, client_id)


@EXAMPLES
@given(
    st.integers(*wire.VERSIONS[wire.INIT_PRODUCER_ID]),
    st.integers(-1, 120),
    INT64,
    INT16,
    INT32,
)
def test_an_init_producer_id_answer_reads_as_kafka_python_decodes_it(
    version: int, code: int, producer_id: int, epoch: int, corr: int
) -> None:
    answer = InitProducerIdResponse(
        throttle_time_ms=0,
        error_code=code,
        producer_id=producer_id,
        producer_epoch=epoch,
        version=version,
    )
    body = encoded_answer(answer, corr)
    decoded = InitProducerIdResponse.decode(body, version=version, header=True)
    read = wire.read_init_producer_id(wire.answer(body, corr, wire.INIT_PRODUCER_ID, version))
    assert read == (decoded.error_code, decoded.producer_id, decoded.producer_epoch)


def test_a_truncated_answer_is_no_answer() -> None:
    answer = ApiVersionsResponse(error_code=0, api_keys=[], version=0)
    body = encoded_answer(answer, 9)
    with pytest.raises(struct.error):
        wire.read_api_versions(wire.answer(body[:-2], 9, wire.API_VERSIONS, 0))
    with pytest.raises(ValueError, match="expected 8"):
        wire.answer(body, 8, wire.API_VERSIONS, 0)


# -- record batches, partitions, errors --------------------------------------------------
@EXAMPLES
@given(
    st.binary(max_size=40),
    st.binary(max_size=3000) | st.text(max_size=800).map(lambda t: (t * 4).encode()),
    st.integers(0, 2**43),
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**15 - 1),
    INT32,
    st.sampled_from([wire.CODEC_NONE, wire.CODEC_LZ4]),
)
def test_a_record_batch_is_what_kafka_python_builds(
    key: bytes,
    value: bytes,
    timestamp_ms: int,
    producer_id: int,
    epoch: int,
    sequence: int,
    codec: int,
) -> None:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=False,
        producer_id=producer_id,
        producer_epoch=epoch,
        base_sequence=sequence,
        batch_size=2**31 - 1,
    )
    builder.append(0, timestamp=timestamp_ms, key=key, value=value, headers=[])
    ours = wire.record_batch(key, value, timestamp_ms, producer_id, epoch, sequence, codec)
    assert ours == bytes(builder.build())
    batch = DefaultRecordBatch(ours)
    assert batch.validate_crc()
    (record,) = list(batch)
    assert (record.key, record.value, record.timestamp) == (key, value, timestamp_ms)
    assert (batch.producer_id, batch.base_sequence) == (producer_id, sequence)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 500))
def test_a_key_goes_to_the_partition_kafka_python_picks(key: bytes, count: int) -> None:
    assert wire.murmur2(key) == kafka_murmur2(key)
    assert wire.partition_of(key, count) == (kafka_murmur2(key) & 0x7FFFFFFF) % count


def test_every_error_code_is_retriable_exactly_where_kafka_python_says() -> None:
    known = {code: kind for code, kind in kafka_errors.kafka_errors.items() if code is not None}
    assert len(known) > 100
    for code, kind in known.items():
        refusal = wire.BrokerRefusal(code, "topic[0]")
        assert (refusal.retriable, refusal.invalid_metadata) == (
            kind.retriable,
            kind.invalid_metadata,
        ), kind.__name__
    assert {
        kafka_errors.OutOfOrderSequenceNumberError.errno,
        kafka_errors.InvalidProducerEpochError.errno,
        kafka_errors.UnknownProducerIdError.errno,
    } == wire.LOST_PRODUCER
    assert kafka_errors.DuplicateSequenceNumberError.errno == wire.DUPLICATE_SEQUENCE


def test_error_names_are_kafka_python_s_but_where_kafka_renamed_them() -> None:
    renamed = {
        -1: "UNKNOWN",
        6: "NOT_LEADER_FOR_PARTITION",
        10: "MESSAGE_SIZE_TOO_LARGE",
        17: "INVALID_TOPIC",
    }
    for code, name in wire.ERROR_NAMES.items():
        expected = kafka_errors.kafka_errors[code].message
        assert (renamed.get(code) or name) == expected, (code, name)
    assert str(wire.BrokerRefusal(3, "gpu.samples")) == "gpu.samples: UNKNOWN_TOPIC_OR_PARTITION"
    assert str(wire.BrokerRefusal(999, "x")) == "x: error code 999"
