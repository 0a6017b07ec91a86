"""Kafka's wire format, as far as the agent's producer speaks it: the four requests it sends
(ApiVersions, Metadata, InitProducerId, Produce), their answers, a record batch (magic 2) of
one record, the murmur2 partitioner and the error codes.

It is written here rather than taken from kafka-python because importing any module of
kafka-python runs its package, which loads the whole client (consumer, admin client, every
protocol class): 7.5 MB of an agent that must stay under 50 MB. The tests hold each encoding
and each reading here to kafka-python's, byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeVar

import crc32c
import lz4.frame

T = TypeVar("T")

PRODUCE, METADATA, API_VERSIONS, INIT_PRODUCER_ID = 0, 3, 18, 22
# The versions this module speaks, per API key. Produce v3 is the first with producer ids and
# v8 the last whose frame ends with its records; InitProducerId below v3 is answered with an
# error by some brokers (Tansu), and v2 on is flexible (tagged fields).
VERSIONS = {API_VERSIONS: (0, 0), METADATA: (1, 8), INIT_PRODUCER_ID: (3, 5), PRODUCE: (3, 8)}
NAMES = {
    PRODUCE: "Produce",
    METADATA: "Metadata",
    API_VERSIONS: "ApiVersions",
    INIT_PRODUCER_ID: "InitProducerId",
}
ACKS_ALL = -1
CODEC_NONE, CODEC_LZ4 = 0, 3
_INT8, _INT16, _INT32, _INT64 = (struct.Struct(f">{c}") for c in "bhiq")
_SIZE = _INT32  # what comes before each request and answer: its size
SIZE_BYTES = _SIZE.size
# The largest answer read: the producer's are a few hundred bytes (one topic's metadata, one
# partition's acknowledgement); a size beyond this is no Kafka answer to them.
MAX_ANSWER_BYTES = 16 << 20
_HEAD = struct.Struct(">hhi")  # api key, version, correlation id


# -- errors ------------------------------------------------------------------------------
class KafkaError(Exception):
    """A broker's error code, or a failure to reach one. `retriable`: the same request may
    succeed later; `invalid_metadata`: ask again who leads the partition first."""

    retriable = False
    invalid_metadata = False


class KafkaConnectionError(KafkaError):
    """No broker answered, the connection broke, or an answer was no answer."""

    retriable = True
    invalid_metadata = True


class BrokerRefusal(KafkaError):
    """An answer's error code, under Kafka's name for it."""

    def __init__(self, code: int, where: str) -> None:
        self.code = code
        self.name = ERROR_NAMES.get(code, f"error code {code}")
        super().__init__(f"{where}: {self.name}")
        self.retriable = code in RETRIABLE or code in STALE_METADATA
        self.invalid_metadata = code in STALE_METADATA


# Kafka's names of the codes a producer meets (others are shown by number).
ERROR_NAMES = {
    -1: "UNKNOWN_SERVER_ERROR",
    2: "CORRUPT_MESSAGE",
    3: "UNKNOWN_TOPIC_OR_PARTITION",
    5: "LEADER_NOT_AVAILABLE",
    6: "NOT_LEADER_OR_FOLLOWER",
    7: "REQUEST_TIMED_OUT",
    9: "REPLICA_NOT_AVAILABLE",
    10: "MESSAGE_TOO_LARGE",
    13: "NETWORK_EXCEPTION",
    17: "INVALID_TOPIC_EXCEPTION",
    18: "RECORD_LIST_TOO_LARGE",
    19: "NOT_ENOUGH_REPLICAS",
    20: "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
    21: "INVALID_REQUIRED_ACKS",
    29: "TOPIC_AUTHORIZATION_FAILED",
    31: "CLUSTER_AUTHORIZATION_FAILED",
    32: "INVALID_TIMESTAMP",
    35: "UNSUPPORTED_VERSION",
    43: "UNSUPPORTED_FOR_MESSAGE_FORMAT",
    45: "OUT_OF_ORDER_SEQUENCE_NUMBER",
    46: "DUPLICATE_SEQUENCE_NUMBER",
    47: "INVALID_PRODUCER_EPOCH",
    56: "KAFKA_STORAGE_ERROR",
    59: "UNKNOWN_PRODUCER_ID",
    74: "FENCED_LEADER_EPOCH",
    75: "UNKNOWN_LEADER_EPOCH",
    87: "INVALID_RECORD",
}
# Retriable codes whose cause is a stale view of the cluster (a moved or missing leader).
STALE_METADATA = frozenset({3, 5, 6, 9, 13, 56, 72, 74, 75, 80, 83, 84, 100, 103})
# The other retriable codes.
RETRIABLE = frozenset({7, 14, 15, 16, 19, 20, 41, 51, 70, 71, 78, 88, 89, 106, 122, 123})
DUPLICATE_SEQUENCE = 46
# The broker no longer knows this producer's id, epoch or sequence.
LOST_PRODUCER = frozenset({45, 47, 59})


# -- encoding ----------------------------------------------------------------------------
def string(text: str | None) -> bytes:
    """A (nullable) STRING: int16 length, UTF-8."""
    if text is None:
        return b"\xff\xff"
    data = text.encode()
    return _INT16.pack(len(data)) + data


def uvarint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint(value: int) -> bytes:
    """A zigzag VARINT or VARLONG, as in a record."""
    return uvarint((value << 1) ^ (value >> 63))


def request_frame(
    api_key: int, version: int, correlation_id: int, client_id: str, body: bytes
) -> bytes:
    """A whole request, its size first; flexible versions get header v2's tagged fields."""
    tags = b"\x00" if api_key == INIT_PRODUCER_ID and version >= 2 else b""
    payload = b"".join((_HEAD.pack(api_key, version, correlation_id), string(client_id), tags))
    return _SIZE.pack(len(payload) + len(body)) + payload + body


def metadata_body(topic: str, version: int) -> bytes:
    """A Metadata request (v1 to v8) for one topic, never creating it."""
    body = _INT32.pack(1) + string(topic)
    if version >= 4:
        body += b"\x00"  # allow_auto_topic_creation
    if version >= 8:
        body += b"\x00\x00"  # no authorized operations
    return body


def init_producer_id_body() -> bytes:
    """An InitProducerId request (v3 to v5) for an idempotent producer, no transactions."""
    return b"\x00" + struct.pack(">iqh", 0, -1, -1) + b"\x00"


def produce_head(
    topic: str, partition: int, version: int, client_id: str, timeout_ms: int
) -> bytes:
    """A Produce request (v3 to v8, `acks=all`) of one partition without its size, its
    correlation id (zeros) and its records: `produce_frame` completes it. The agent sends one
    a second to the same partitions, so it is made once per partition."""
    if not 3 <= version <= VERSIONS[PRODUCE][1]:
        raise ValueError(f"Produce v{version}: only v3 to v{VERSIONS[PRODUCE][1]} end with records")
    frame = request_frame(
        PRODUCE,
        version,
        0,
        client_id,
        string(None)  # transactional id
        + struct.pack(">hii", ACKS_ALL, timeout_ms, 1)
        + string(topic)
        + struct.pack(">ii", 1, partition),
    )
    return frame[4:]


def produce_frame(head: bytes, correlation_id: int, records: bytes) -> bytes:
    """The request `head` stands for, with its correlation id and `records`, size first."""
    return b"".join(
        (
            _SIZE.pack(len(head) + 4 + len(records)),
            head[:4],  # api key and version
            _INT32.pack(correlation_id),
            head[8:],
            _SIZE.pack(len(records)),
            records,
        )
    )


# -- record batches ----------------------------------------------------------------------
_BATCH = struct.Struct(">qiibIhiqqqhii")
_CRC_FROM = 21  # the CRC covers the batch from its attributes on
_CRC_AT = 17


def record_batch(
    key: bytes,
    value: bytes,
    timestamp_ms: int,
    producer_id: int,
    producer_epoch: int,
    base_sequence: int,
    codec: int = CODEC_NONE,
) -> bytes:
    """A record batch (magic 2) of one record; compressed only where that makes it smaller."""
    record = b"".join(
        (b"\x00\x00\x00", varint(len(key)), key, varint(len(value)), value, b"\x00")
    )  # attributes, timestamp delta, offset delta; key; value; no headers
    records = varint(len(record)) + record
    attributes = 0
    if codec == CODEC_LZ4:
        packed = lz4.frame.compress(records, block_linked=False)
        if len(packed) < len(records):
            records, attributes = packed, CODEC_LZ4
    elif codec != CODEC_NONE:
        raise ValueError(f"compression codec {codec}: only none (0) and lz4 (3)")
    batch = bytearray(_BATCH.size + len(records))
    _BATCH.pack_into(
        batch,
        0,
        0,  # base offset: the broker's
        len(batch) - 12,  # from here to the end
        0,  # partition leader epoch: the broker's
        2,  # magic
        0,  # CRC, below
        attributes,
        0,  # last offset delta
        timestamp_ms,
        timestamp_ms,
        producer_id,
        producer_epoch,
        base_sequence,
        1,
    )
    batch[_BATCH.size :] = records
    struct.pack_into(">I", batch, _CRC_AT, crc32c.crc32c(memoryview(batch)[_CRC_FROM:]))
    return bytes(batch)


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of a key, unsigned (what the Java client and kafka-python
    partition by)."""
    length = len(data)
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    h = (seed ^ length) & 0xFFFFFFFF
    whole = length - length % 4
    for (k,) in struct.iter_unpack("<I", data[:whole]):
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = length % 4
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_of(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# -- answers -----------------------------------------------------------------------------
class Reader:
    """Reads the fields of an answer of `version` in order; `struct.error` past its end."""

    def __init__(self, data: bytes, version: int) -> None:
        self.data = data
        self.version = version
        self.at = 0

    def _take(self, shape: struct.Struct) -> int:
        (value,) = shape.unpack_from(self.data, self.at)
        self.at += shape.size
        return int(value)

    def int8(self) -> int:
        return self._take(_INT8)

    def int16(self) -> int:
        return self._take(_INT16)

    def int32(self) -> int:
        return self._take(_INT32)

    def int64(self) -> int:
        return self._take(_INT64)

    def string(self) -> str | None:
        size = self.int16()
        if size < 0:
            return None
        if self.at + size > len(self.data):
            raise struct.error("a string past the answer's end")
        text = self.data[self.at : self.at + size].decode()
        self.at += size
        return text

    def array(self, item: Callable[[Reader], T]) -> list[T]:
        return [item(self) for _ in range(max(self.int32(), 0))]

    def uvarint(self) -> int:
        value = shift = 0
        while True:
            if self.at >= len(self.data):
                raise struct.error("a varint past the answer's end")
            byte = self.data[self.at]
            self.at += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    def skip_tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self.at += self.uvarint()
        if self.at > len(self.data):
            raise struct.error("tagged fields past the answer's end")


def answer_size(prefix: bytes) -> int:
    """The size an answer's first `SIZE_BYTES` announce; ValueError when it cannot be one."""
    (size,) = _SIZE.unpack(prefix)
    if not 0 <= size <= MAX_ANSWER_BYTES:
        raise ValueError(f"an answer of {size} bytes: not Kafka")
    return size


def answer(body: bytes, correlation_id: int, api_key: int, version: int) -> Reader:
    """A reader past the answer's header; ValueError when it answers another request."""
    read = Reader(body, version)
    answered = read.int32()
    if answered != correlation_id:
        raise ValueError(f"answer {answered}, expected {correlation_id}")
    if api_key == INIT_PRODUCER_ID and version >= 2:
        read.skip_tags()
    return read


def read_api_versions(read: Reader) -> tuple[int, dict[int, tuple[int, int]]]:
    """An ApiVersions answer (v0): (error code, {api key: (min version, max version)})."""
    code = read.int16()
    ranges = read.array(lambda r: (r.int16(), r.int16(), r.int16()))
    return code, {key: (low, high) for key, low, high in ranges}


def read_metadata(
    read: Reader,
) -> tuple[dict[int, tuple[str, int]], dict[str, tuple[int, list[tuple[int, int, int]]]]]:
    """A Metadata answer (v1 to v8): ({node id: (host, port)}, {topic: (error code,
    [(partition, error code, leader id)])})."""
    version = read.version
    if version >= 3:
        read.int32()  # throttle time

    def broker(r: Reader) -> tuple[int, tuple[str, int]]:
        node, host, port = r.int32(), r.string() or "", r.int32()
        r.string()  # rack
        return node, (host, port)

    brokers = dict(read.array(broker))
    if version >= 2:
        read.string()  # cluster id
    read.int32()  # controller id

    def partition(r: Reader) -> tuple[int, int, int]:
        code, index, leader = r.int16(), r.int32(), r.int32()
        if version >= 7:
            r.int32()  # leader epoch
        r.array(Reader.int32)  # replicas
        r.array(Reader.int32)  # in-sync replicas
        if version >= 5:
            r.array(Reader.int32)  # offline replicas
        return index, code, leader

    def topic(r: Reader) -> tuple[str, tuple[int, list[tuple[int, int, int]]]]:
        code, name = r.int16(), r.string() or ""
        r.int8()  # internal
        partitions = r.array(partition)
        if version >= 8:
            r.int32()  # authorized operations
        return name, (code, partitions)

    return brokers, dict(read.array(topic))


def read_init_producer_id(read: Reader) -> tuple[int, int, int]:
    """An InitProducerId answer (v3 to v5): (error code, producer id, epoch)."""
    read.int32()  # throttle time
    code = read.int16()
    return code, read.int64(), read.int16()


_PRODUCE_ANSWER = struct.Struct(">iih")  # partitions in the topic, partition index, error code


def produce_answer(body: bytes, correlation_id: int) -> tuple[int, int]:
    """(partition index, error code) of a one-partition Produce answer (v3 to v8), header
    included; ValueError when it is not the answer to `correlation_id`."""
    (answered,) = _INT32.unpack_from(body, 0)
    (topics,) = _INT32.unpack_from(body, 4)
    if answered != correlation_id or topics != 1:
        raise ValueError(f"answer {answered} with {topics} topics, expected {correlation_id}")
    (name_size,) = _INT16.unpack_from(body, 8)
    partitions, index, code = _PRODUCE_ANSWER.unpack_from(body, 10 + max(name_size, 0))
    if partitions != 1:
        raise ValueError(f"an answer for {partitions} partitions, expected one")
    return index, code
