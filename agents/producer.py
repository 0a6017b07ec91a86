"""The spool sender's Kafka producer: one record batch at a time, sent and acknowledged in the
calling thread, on a blocking socket.

kafka-python's `KafkaProducer` keeps a network thread, an accumulator and a selector for many
records in flight. The spool sender has one message in flight, once a second, and that
machinery cost the agent a third of its CPU (about 1.3 ms a message, on a thread woken for
it). This producer speaks the same protocol with kafka-python's own request classes and
record-batch builder, and nothing else:

- ApiVersions picks each request's version: the highest both sides know.
- InitProducerId gives the producer id and epoch. A batch carries its partition's sequence,
  which moves on only once the broker has the batch, so a batch sent again after a lost
  answer is recognised as a duplicate (idempotence, `acks=all`).
- A keyed record goes to the partition of its key's murmur2 hash, as kafka-python and the
  Java client choose it.
- Metadata names each partition's leader. A leader that moved is asked again and the batch
  sent once more at once; a lost connection or a timeout is retriable, and the next send
  asks for metadata again.
- A Produce request (v3 to v8) is kafka-python's encoding of its partition, made once; each
  send writes the correlation id and the records into it, and reads the answer's error code.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from typing import Any

from kafka.errors import (
    DuplicateSequenceNumberError,
    InvalidProducerEpochError,
    KafkaConnectionError,
    KafkaError,
    OutOfOrderSequenceNumberError,
    UnknownProducerIdError,
    UnknownTopicOrPartitionError,
    UnsupportedVersionError,
    for_code,
)
from kafka.partitioner.default import murmur2
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
)
from kafka.record.default_records import DefaultRecordBatchBuilder

log = logging.getLogger(__name__)

ACKS_ALL = -1
DEFAULT_PORT = 9092
CODECS = {None: DefaultRecordBatchBuilder.CODEC_NONE, "lz4": DefaultRecordBatchBuilder.CODEC_LZ4}
# The oldest versions this producer speaks: Produce v3 carries record batches with producer
# ids; InitProducerId below v3 is answered with an error by some brokers (Tansu).
_MIN_VERSION = {ProduceRequest: 3, InitProducerIdRequest: 3, MetadataRequest: 1}
# Answers that say the broker no longer knows this producer's id, epoch or sequence.
_LOST_PRODUCER = (OutOfOrderSequenceNumberError, UnknownProducerIdError, InvalidProducerEpochError)
METADATA_MAX_AGE_S = 300.0  # as Kafka's clients: new partitions are seen within 5 minutes
# The newest Produce version without tagged fields: a request ends with its records, so one
# encoding per partition serves every send (`produce_head`).
PRODUCE_MAX_VERSION = 8
_SIZE = struct.Struct(">i")
_PRODUCE_ANSWER = struct.Struct(">iih")  # partitions in the topic, partition index, error code


def produce_request(topic: str, partition: int, timeout_ms: int, records: bytes) -> Any:
    """kafka-python's ProduceRequest of `records` to one partition, `acks=all`."""
    topic_data = ProduceRequest.TopicProduceData
    return ProduceRequest(
        transactional_id=None,
        acks=ACKS_ALL,
        timeout_ms=timeout_ms,
        topic_data=[
            topic_data(
                name=topic,
                partition_data=[topic_data.PartitionProduceData(index=partition, records=records)],
            )
        ],
    )


def produce_head(
    topic: str, partition: int, version: int, client_id: str, timeout_ms: int
) -> bytes:
    """A ProduceRequest (v3 to v8, `acks=all`) of one partition, as kafka-python encodes it,
    without its size, its correlation id (zeros) and its records: `produce_frame` completes it.
    The agent sends one a second, and kafka-python's encoding cost more than the rest of a send.
    """
    if not 3 <= version <= PRODUCE_MAX_VERSION:
        raise ValueError(f"Produce v{version}: only v3 to v{PRODUCE_MAX_VERSION} end with records")
    request = produce_request(topic, partition, timeout_ms, b"")
    request.with_header(correlation_id=0, client_id=client_id)
    frame = request.encode(version=version, header=True, framed=True)
    assert frame.endswith(b"\x00\x00\x00\x00"), "empty records are 4 zero bytes of length"
    return frame[4:-4]


def produce_frame(head: bytes, correlation_id: int, records: bytes) -> bytes:
    """The request `head` stands for, with its correlation id and `records`, size first."""
    return b"".join(
        (
            _SIZE.pack(len(head) + 4 + len(records)),
            head[:4],  # api key and version
            _SIZE.pack(correlation_id),
            head[8:],
            _SIZE.pack(len(records)),
            records,
        )
    )


def produce_answer(body: bytes, correlation_id: int) -> tuple[int, int]:
    """(partition index, error code) of a one-partition ProduceResponse v3 to v8, header
    included; ValueError when it is not the answer to `correlation_id`."""
    (answered,) = _SIZE.unpack_from(body, 0)
    (topics,) = _SIZE.unpack_from(body, 4)
    if answered != correlation_id or topics != 1:
        raise ValueError(f"answer {answered} with {topics} topics, expected {correlation_id}")
    (name_size,) = struct.unpack_from(">h", body, 8)
    partitions, index, code = _PRODUCE_ANSWER.unpack_from(body, 10 + max(name_size, 0))
    if partitions != 1:
        raise ValueError(f"an answer for {partitions} partitions, expected one")
    return index, code


class BrokerNotReady(KafkaError):
    """The cluster cannot take records yet (no metadata, no producer id, a version it lacks):
    nothing is wrong with the record, so the sender keeps it and tries again."""

    retriable = True
    invalid_metadata = True


class _Connection:
    """One broker: a blocking socket and the request versions agreed with it."""

    def __init__(
        self,
        address: tuple[str, int],
        client_id: str,
        connect_timeout_s: float,
        request_timeout_s: float,
    ) -> None:
        self.address = "{}:{}".format(*address)
        self.client_id = client_id
        try:
            self.sock = socket.create_connection(address, timeout=connect_timeout_s)
        except OSError as exc:
            raise KafkaConnectionError(f"{self.address}: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._correlation = 0
        self._timeout_ms = int(request_timeout_s * 1000)
        self._produce_heads: dict[tuple[str, int], bytes] = {}
        self.versions: dict[int, int] = {}
        answer = self.call(ApiVersionsRequest(), ApiVersionsResponse, 0)
        if answer.error_code:
            raise for_code(answer.error_code)(f"{self.address}: ApiVersions")
        self.versions = {a.api_key: a.max_version for a in answer.api_keys}
        self.sock.settimeout(request_timeout_s)  # connected: each answer waits this long

    def version(self, request: Any) -> int:
        """The highest version of `request` that the broker and kafka-python both speak."""
        ours = _MIN_VERSION.get(request, 0)
        theirs = self.versions.get(request.API_KEY)
        chosen = min(request.max_version, theirs if theirs is not None else -1)
        if chosen < ours:
            raise UnsupportedVersionError(
                f"{self.address} does not speak {request.__name__} v{ours} or newer"
            )
        return chosen

    def call(self, request: Any, answer_type: Any, version: int | None = None) -> Any:
        """Send `request` and wait for its answer (the socket's timeout bounds each read)."""
        if version is None:
            version = self.version(type(request))
        self._correlation += 1
        request.with_header(correlation_id=self._correlation, client_id=self.client_id)
        body = self._exchange(request.encode(version=version, header=True, framed=True))
        try:
            answer = answer_type.decode(body, version=version, header=True)
        except Exception as exc:  # whatever the bytes were, they are no answer
            raise KafkaConnectionError(f"{self.address}: an answer that does not decode") from exc
        if answer.header.correlation_id != self._correlation:
            raise KafkaConnectionError(f"{self.address}: an answer to another request")
        return answer

    def produce(self, topic: str, partition: int, records: bytes) -> int:
        """Write a record batch to `topic[partition]`: the answer's error code (0: stored)."""
        head = self._produce_heads.get((topic, partition))
        if head is None:
            version = min(self.version(ProduceRequest), PRODUCE_MAX_VERSION)
            head = produce_head(topic, partition, version, self.client_id, self._timeout_ms)
            self._produce_heads[(topic, partition)] = head
        self._correlation += 1
        body = self._exchange(produce_frame(head, self._correlation, records))
        try:
            index, code = produce_answer(body, self._correlation)
        except (ValueError, struct.error) as exc:
            raise KafkaConnectionError(f"{self.address}: {exc}") from exc
        if index != partition:
            raise KafkaConnectionError(f"{self.address}: an answer for partition {index}")
        return code

    def _exchange(self, frame: bytes) -> bytes:
        """Send one request frame; the answer's bytes (its header first)."""
        try:
            self.sock.sendall(frame)
            (size,) = _SIZE.unpack(self._read(_SIZE.size))
            return self._read(size)
        except OSError as exc:  # timeouts included
            raise KafkaConnectionError(f"{self.address}: {exc!r}") from exc

    def _read(self, size: int) -> bytes:
        view = bytearray(size)
        got = 0
        while got < size:
            n = self.sock.recv_into(memoryview(view)[got:])
            if n == 0:
                raise ConnectionResetError("the broker closed the connection")
            got += n
        return bytes(view)

    def close(self) -> None:
        self.sock.close()

    def interrupt(self) -> None:
        """Make a read that waits in another thread return now."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class BatchProducer:
    """An idempotent producer of one record at a time, each acknowledged before `send`
    returns; `KafkaError` when it is not (retriable or not, as the error says)."""

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str = "gpuledger-agent",
        request_timeout_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        compression: str | None = "lz4",
    ) -> None:
        self.bootstrap = [_address(part) for part in bootstrap.split(",") if part.strip()]
        if not self.bootstrap:
            raise ValueError(f"no broker address in {bootstrap!r}")
        self.client_id = client_id
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.codec = CODECS[compression]
        self._brokers: dict[int, tuple[str, int]] = {}
        self._leaders: dict[str, list[int]] = {}  # topic -> leader of each partition
        self._metadata_at = 0.0
        self._connections: dict[tuple[str, int], _Connection] = {}
        self._producer: tuple[int, int] | None = None  # (id, epoch)
        self._sequence: dict[tuple[str, int], int] = {}
        self._closed = False

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Write one record and return once every in-sync replica has it."""
        try:
            self._send(topic, key, value)
        except KafkaError as exc:
            if not exc.invalid_metadata:
                raise
            self._forget_metadata()
            self._disconnect()
            if isinstance(exc, KafkaConnectionError | BrokerNotReady):
                raise  # the broker is away: the sender waits before it tries again
            # A leader that moved: what a partition election answers. Ask who leads now and
            # send once more at once (the batch was not stored: same sequence).
            log.info("%s: %r; sending again to the partition's leader now", topic, exc)
            self._send(topic, key, value)

    def _send(self, topic: str, key: bytes, value: bytes) -> None:
        try:
            leaders = self._partitions(topic)
            producer_id, epoch = self._producer_id()
        except KafkaError as exc:
            if exc.retriable:
                raise
            raise BrokerNotReady(repr(exc)) from exc
        partition = (murmur2(key) & 0x7FFFFFFF) % len(leaders)
        slot = (topic, partition)
        batch = DefaultRecordBatchBuilder(
            magic=2,
            compression_type=self.codec,
            is_transactional=False,
            producer_id=producer_id,
            producer_epoch=epoch,
            base_sequence=self._sequence.get(slot, 0),
            batch_size=2**31 - 1,
        )
        batch.append(0, timestamp=int(time.time() * 1000), key=key, value=value, headers=[])
        connection = self._connection(leaders[partition])
        code = connection.produce(topic, partition, bytes(batch.build()))
        error = for_code(code) if code else None
        if error in _LOST_PRODUCER:
            # The broker lost this producer's state: start a new one (what it then gets may
            # repeat what it had, which the store's deduplication absorbs).
            log.warning("%s: %s; starting a new producer id", topic, error.__name__)
            self._producer = None
            self._sequence.clear()
            raise KafkaConnectionError(f"{topic}[{partition}]: {error.__name__}")
        if error is not None and error is not DuplicateSequenceNumberError:
            raise error(f"{topic}[{partition}]")
        self._sequence[slot] = self._sequence.get(slot, 0) + 1

    def _partitions(self, topic: str) -> list[int]:
        if time.monotonic() - self._metadata_at > METADATA_MAX_AGE_S:
            self._forget_metadata()
        leaders = self._leaders.get(topic)
        if leaders is None:
            leaders = self._leaders[topic] = self._ask_leaders(topic)
            self._metadata_at = time.monotonic()
        return leaders

    def _ask_leaders(self, topic: str) -> list[int]:
        request = MetadataRequest(
            topics=[MetadataRequest.MetadataRequestTopic(name=topic)],
            allow_auto_topic_creation=False,
        )
        answer = self._any_connection().call(request, MetadataResponse)
        self._brokers = {b.node_id: (b.host, b.port) for b in answer.brokers}
        (found,) = answer.topics
        if found.error_code:
            raise for_code(found.error_code)(topic)
        partitions = sorted(found.partitions, key=lambda p: p.partition_index)
        if not partitions or any(p.leader_id < 0 for p in partitions):
            raise UnknownTopicOrPartitionError(f"{topic}: no leader for every partition yet")
        return [p.leader_id for p in partitions]

    def _producer_id(self) -> tuple[int, int]:
        if self._producer is None:
            request = InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=0)
            answer = self._any_connection().call(request, InitProducerIdResponse)
            if answer.error_code:
                raise for_code(answer.error_code)("InitProducerId")
            self._producer = (answer.producer_id, answer.producer_epoch)
        return self._producer

    def _connection(self, node_id: int) -> _Connection:
        address = self._brokers.get(node_id)
        if address is None:
            raise KafkaConnectionError(f"broker {node_id} is not in the metadata")
        return self._connect(address)

    def _any_connection(self) -> _Connection:
        """A broker already connected, else the first of the known and bootstrap ones."""
        if self._connections:
            return next(iter(self._connections.values()))
        errors: list[str] = []
        for address in [*self._brokers.values(), *self.bootstrap]:
            try:
                return self._connect(address)
            except KafkaError as exc:
                errors.append(str(exc))
        raise KafkaConnectionError("no broker answers: " + "; ".join(errors))

    def _connect(self, address: tuple[str, int]) -> _Connection:
        if self._closed:
            raise KafkaConnectionError("the producer is closed")
        connection = self._connections.get(address)
        if connection is None:
            connection = _Connection(
                address, self.client_id, self.connect_timeout_s, self.request_timeout_s
            )
            self._connections[address] = connection
        return connection

    def _forget_metadata(self) -> None:
        self._leaders.clear()
        self._metadata_at = 0.0

    def _disconnect(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def interrupt(self) -> None:
        """From another thread: make a `send` that waits fail now (it raises, retriable)."""
        self._closed = True
        for connection in list(self._connections.values()):
            connection.interrupt()

    def close(self) -> None:
        self._closed = True
        self._disconnect()


def _address(text: str) -> tuple[str, int]:
    """`host:port`, `host` (port 9092, as kafka-python reads it) or `[v6 address]:port`."""
    text = text.strip()
    host, colon, port = text.rpartition(":")
    if not colon or (host.count(":") and not host.endswith("]")):
        host, port = text, str(DEFAULT_PORT)  # no port, or a bare IPv6 address
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"broker address {text!r} is not HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)
