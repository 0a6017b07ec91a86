"""The spool sender's Kafka producer: one record batch at a time, sent and acknowledged in the
calling thread, on a blocking socket.

kafka-python's `KafkaProducer` keeps a network thread, an accumulator and a selector for many
records in flight. The spool sender has one message in flight, once a second, and that
machinery cost the agent a third of its CPU (about 1.3 ms a message, on a thread woken for
it), and importing it a sixth of its memory. This producer speaks the same protocol
(`kafka_wire`), and nothing else:

- ApiVersions picks each request's version: the highest both sides know.
- InitProducerId gives the producer id and epoch. A batch carries its partition's sequence,
  which moves on only once the broker has the batch, so a batch sent again after a lost
  answer is recognised as a duplicate (idempotence, `acks=all`).
- A keyed record goes to the partition of its key's murmur2 hash, as kafka-python and the
  Java client choose it.
- Metadata names each partition's leader. A leader that moved is asked again and the batch
  sent once more at once; a lost connection or a timeout is retriable, and the next send
  asks for metadata again.
- A Produce request (v3 to v8) is encoded once per partition; each send writes the
  correlation id and the records into it, and reads the answer's error code.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

from gpuledger.agents.kafka_wire import (
    API_VERSIONS,
    CODEC_LZ4,
    CODEC_NONE,
    DUPLICATE_SEQUENCE,
    INIT_PRODUCER_ID,
    LOST_PRODUCER,
    METADATA,
    NAMES,
    PRODUCE,
    SIZE_BYTES,
    VERSIONS,
    BrokerRefusal,
    KafkaConnectionError,
    KafkaError,
    Reader,
    answer,
    answer_size,
    init_producer_id_body,
    metadata_body,
    partition_of,
    produce_answer,
    produce_frame,
    produce_head,
    read_api_versions,
    read_init_producer_id,
    read_metadata,
    record_batch,
    request_frame,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 9092
CODECS = {None: CODEC_NONE, "lz4": CODEC_LZ4}
METADATA_MAX_AGE_S = 300.0  # as Kafka's clients: new partitions are seen within 5 minutes


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
        self.versions: dict[int, tuple[int, int]] = {API_VERSIONS: (0, 0)}
        code, self.versions = self.call(API_VERSIONS, lambda _: b"", read_api_versions)
        if code:
            raise BrokerRefusal(code, f"{self.address}: ApiVersions")
        self.sock.settimeout(request_timeout_s)  # connected: each answer waits this long

    def version(self, api_key: int) -> int:
        """The highest version of the request that the broker and this producer both speak."""
        low, high = VERSIONS[api_key]
        theirs = self.versions.get(api_key, (0, -1))
        chosen = min(high, theirs[1])
        if chosen < max(low, theirs[0]):
            raise KafkaError(
                f"{self.address} speaks {NAMES[api_key]} v{theirs[0]} to v{theirs[1]}, "
                f"this producer v{low} to v{high}"
            )
        return chosen

    def call(self, api_key: int, body: Callable[[int], bytes], read: Callable[[Reader], T]) -> T:
        """Send a request (its body for the agreed version) and read its answer."""
        version = self.version(api_key)
        self._correlation += 1
        frame = request_frame(api_key, version, self._correlation, self.client_id, body(version))
        raw = self._exchange(frame)
        try:
            return read(answer(raw, self._correlation, api_key, version))
        except (ValueError, struct.error) as exc:  # whatever the bytes were, no answer
            raise KafkaConnectionError(f"{self.address}: {NAMES[api_key]}: {exc}") from exc

    def produce(self, topic: str, partition: int, records: bytes) -> int:
        """Write a record batch to `topic[partition]`: the answer's error code (0: stored)."""
        head = self._produce_heads.get((topic, partition))
        if head is None:
            version = self.version(PRODUCE)
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
            return self._read(answer_size(self._read(SIZE_BYTES)))
        except (OSError, ValueError) as exc:  # timeouts included; a size no answer has
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
        partition = partition_of(key, len(leaders))
        slot = (topic, partition)
        batch = record_batch(
            key,
            value,
            int(time.time() * 1000),
            producer_id,
            epoch,
            self._sequence.get(slot, 0),
            self.codec,
        )
        code = self._connection(leaders[partition]).produce(topic, partition, batch)
        if code in LOST_PRODUCER:
            # The broker lost this producer's state: start a new one (what it then gets may
            # repeat what it had, which the store's deduplication absorbs).
            refusal = BrokerRefusal(code, f"{topic}[{partition}]")
            log.warning("%s; starting a new producer id", refusal)
            self._producer = None
            self._sequence.clear()
            raise KafkaConnectionError(str(refusal))
        if code and code != DUPLICATE_SEQUENCE:  # a duplicate: the broker has it already
            raise BrokerRefusal(code, f"{topic}[{partition}]")
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
        brokers, topics = self._any_connection().call(
            METADATA, lambda version: metadata_body(topic, version), read_metadata
        )
        self._brokers = brokers
        if topic not in topics:
            raise BrokerNotReady(f"{topic}: not in the metadata answer")
        code, partitions = topics[topic]
        if code:
            raise BrokerRefusal(code, topic)
        partitions.sort()
        if not partitions or any(leader < 0 for _, _, leader in partitions):
            raise BrokerRefusal(5, f"{topic}: no leader for every partition yet")
        return [leader for _, _, leader in partitions]

    def _producer_id(self) -> tuple[int, int]:
        if self._producer is None:
            code, producer_id, epoch = self._any_connection().call(
                INIT_PRODUCER_ID, lambda _: init_producer_id_body(), read_init_producer_id
            )
            if code:
                raise BrokerRefusal(code, "InitProducerId")
            self._producer = (producer_id, epoch)
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
