"""The agent's own producer against the real broker: what it writes, where, and once."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from gpuledger.agents.kafka_wire import KafkaError
from gpuledger.agents.producer import BatchProducer
from gpuledger.broker import EmbeddedBroker, ensure_topics
from gpuledger.schema.topics import Topics

pytestmark = pytest.mark.integration


def fresh_topic(broker: EmbeddedBroker, name: str, partitions: int = 1) -> str:
    topics = Topics(prefix=f"{name}.")
    ensure_topics(broker.bootstrap, topics, partitions=partitions)
    return topics.samples


def read_all(broker: EmbeddedBroker, topic: str, partitions: int, at_least: int) -> list:
    """Every record of `topic` as (partition, key, value), once `at_least` arrived and the
    topic has been quiet for a second."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    assigned = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(assigned)
    consumer.seek_to_beginning(*assigned)
    found: list = []
    deadline = time.monotonic() + 20
    quiet_until = time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline:
            got = False
            for batch in consumer.poll(timeout_ms=200).values():
                found.extend((r.partition, r.key, r.value) for r in batch)
                got = True
            if got:
                quiet_until = time.monotonic() + 1.0
            elif len(found) >= at_least and time.monotonic() > quiet_until:
                break
    finally:
        consumer.close()
    return found


def test_records_arrive_in_order_in_the_partition_kafka_python_picks_for_their_key(
    broker: EmbeddedBroker,
) -> None:
    topic = fresh_topic(broker, "producer-keys", partitions=4)
    producer = BatchProducer(broker.bootstrap)
    reference = KafkaProducer(bootstrap_servers=broker.bootstrap)
    try:
        keys = [f"node-{i}".encode() for i in range(12)]
        expected: dict[bytes, int] = {}
        for key in keys:
            expected[key] = reference.send(topic, key=key, value=b"ref").get(timeout=10).partition
        for n in range(3):
            for key in keys:
                producer.send(topic, key, key + b"#%d" % n)
    finally:
        reference.close()
        producer.close()
    ours = [r for r in read_all(broker, topic, 4, 48) if r[2] != b"ref"]
    assert len(ours) == 36
    for partition, key, _ in ours:
        assert partition == expected[key], key
    for key in keys:
        assert [v for _, k, v in ours if k == key] == [key + b"#%d" % n for n in range(3)]


def test_a_batch_sent_again_after_its_answer_was_lost_is_stored_once(
    broker: EmbeddedBroker,
) -> None:
    topic = fresh_topic(broker, "producer-resend")
    producer = BatchProducer(broker.bootstrap)
    try:
        producer.send(topic, b"node", b"first")
        producer.send(topic, b"node", b"second")
        # The broker stored "second" but its answer never came: the sequence did not move on,
        # and the sender sends the same record again.
        producer._sequence[(topic, 0)] -= 1
        producer.send(topic, b"node", b"second")
        producer.send(topic, b"node", b"third")
    finally:
        producer.close()
    values = [v for _, _, v in read_all(broker, topic, 1, 3)]
    assert values == [b"first", b"second", b"third"]


def test_a_frozen_broker_is_a_retriable_error_within_the_timeout_and_then_it_goes_on(
    broker: EmbeddedBroker,
) -> None:
    topic = fresh_topic(broker, "producer-frozen")
    producer = BatchProducer(broker.bootstrap, request_timeout_s=1.0)
    try:
        producer.send(topic, b"node", b"before")
        broker.pause()
        try:
            started = time.monotonic()
            with pytest.raises(KafkaError) as caught:
                producer.send(topic, b"node", b"during")
            assert caught.value.retriable
            assert time.monotonic() - started < 5
        finally:
            broker.resume()
        producer.send(topic, b"node", b"during")  # what the sender does: the same again
        producer.send(topic, b"node", b"after")
    finally:
        producer.close()
    values = [v for _, _, v in read_all(broker, topic, 1, 3)]
    assert values[0] == b"before" and values[-1] == b"after"
    assert values.count(b"during") == 1


def test_interrupt_ends_a_send_that_waits_on_a_frozen_broker(broker: EmbeddedBroker) -> None:
    topic = fresh_topic(broker, "producer-interrupt")
    producer = BatchProducer(broker.bootstrap, request_timeout_s=30.0)
    outcome: list[BaseException | None] = []

    def send() -> None:
        try:
            producer.send(topic, b"node", b"stuck")
            outcome.append(None)
        except KafkaError as exc:
            outcome.append(exc)

    producer.send(topic, b"node", b"warm")
    broker.pause()
    try:
        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.5)
        started = time.monotonic()
        producer.interrupt()
        sender.join(timeout=5)
        assert not sender.is_alive()
        assert time.monotonic() - started < 2
    finally:
        broker.resume()
        producer.close()
    assert isinstance(outcome[0], KafkaError) and outcome[0].retriable


def test_a_topic_that_does_not_exist_or_a_broker_that_is_not_there_keeps_the_record(
    broker: EmbeddedBroker,
) -> None:
    producer = BatchProducer(broker.bootstrap)
    try:
        with pytest.raises(KafkaError) as caught:
            producer.send("producer-missing.samples", b"node", b"value")
        assert caught.value.retriable  # the sender keeps the record and tries again
    finally:
        producer.close()
    nobody = BatchProducer("127.0.0.1:9", connect_timeout_s=0.5)
    with pytest.raises(KafkaError) as caught:
        nobody.send("any", b"node", b"value")
    assert caught.value.retriable
    assert "127.0.0.1:9" in str(caught.value)


def test_broker_addresses_read_as_kafka_python_reads_them_and_others_are_refused_by_name() -> None:
    producer = BatchProducer("kafka, kafka-2:9093,[::1]:9094")
    assert producer.bootstrap == [("kafka", 9092), ("kafka-2", 9093), ("::1", 9094)]
    with pytest.raises(ValueError, match="'kafka:port' is not HOST:PORT"):
        BatchProducer("kafka:port")
    with pytest.raises(ValueError, match="no broker address"):
        BatchProducer(" , ")


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 400 Bad Request\r\n\r\n",  # something else listens there
        b"\x7f\xff\xff\xff",  # an answer of 2 GB
        b"\xff\xff\xff\xf0",  # a negative size
        b"\x00\x00\x00\x08\x00\x00\x00\x01\x00\x00\x7f\xff",  # ApiVersions, 32,767 keys, none there
        b"\x00\x00\x00\x06\x00\x00\x00\x02\x00\x00",  # an answer to another request
    ],
)
def test_a_peer_that_answers_no_kafka_is_a_retriable_error_and_nothing_more(reply: bytes) -> None:
    """Whatever comes back, the record stays with the sender (retriable, the peer named),
    and the producer neither hangs nor allocates what the bytes claim."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"

        def answer_once() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.recv(1024)
                peer.sendall(reply)
                time.sleep(0.5)

        peer_thread = threading.Thread(target=answer_once, daemon=True)
        peer_thread.start()
        producer = BatchProducer(address, request_timeout_s=2, connect_timeout_s=2)
        started = time.monotonic()
        with pytest.raises(KafkaError) as caught:
            producer.send("samples", b"node", b"value")
        producer.close()
        peer_thread.join(timeout=5)
    assert caught.value.retriable
    assert address in str(caught.value)
    assert time.monotonic() - started < 5
