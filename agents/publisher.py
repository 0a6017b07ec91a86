"""Kafka publishing for the agent: one `SampleBatch` per node and interval, keyed by node.

Values are the pydantic models as JSON (orjson of `model_dump(mode="json")`). The producer is
idempotent with `acks=all` and lz4 batches. A record Kafka does not take (broker unreachable
past the delivery timeout, buffer full) is counted and handed to `on_undelivered`, the seam
where the on-disk spool plugs in; the agent itself never blocks for long on a dead broker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError
from pydantic import BaseModel

from schema.messages import SampleBatch
from schema.topics import Topics

log = logging.getLogger(__name__)

# (full topic name, key, value, the error): what a spool needs to send the record later.
Undelivered = Callable[[str, bytes, bytes, BaseException], None]


def encode(message: BaseModel) -> bytes:
    """The wire form of every gpuledger message."""
    return orjson.dumps(message.model_dump(mode="json"))


@dataclass
class PublishStats:
    sent: int = 0  # handed to the producer
    delivered: int = 0  # acknowledged by the broker
    failed: int = 0  # refused or timed out: given to on_undelivered


class Publisher:
    """A kafka-python producer for the agent's topics."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics | None = None,
        *,
        client_id: str = "gpuledger-agent",
        linger_ms: int = 20,
        max_block_ms: int = 2000,
        on_undelivered: Undelivered | None = None,
        **producer_config: Any,
    ) -> None:
        self.topics = topics or Topics()
        self.on_undelivered = on_undelivered
        self.stats = PublishStats()
        self._lock = threading.Lock()
        config: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "client_id": client_id,
            "acks": "all",
            "enable_idempotence": True,  # a retried batch is not written twice
            "compression_type": "lz4",
            "linger_ms": linger_ms,
            # send() waits this long at most for metadata or buffer space, so a broker
            # outage delays one tick, not the agent.
            "max_block_ms": max_block_ms,
        }
        config.update(producer_config)
        self._producer = KafkaProducer(**config)

    def publish_batch(self, batch: SampleBatch) -> None:
        """One node's samples for one interval, keyed by node (its GPUs share a partition)."""
        self.publish("samples", batch.node, batch)

    def publish(self, topic_short: str, key: str, message: BaseModel) -> None:
        """A message on `topic_short` ("jobs", "nodes", "usage", ...) under `key`."""
        self.send_raw(self.topics.name(topic_short), key.encode(), encode(message))

    def send_raw(self, topic: str, key: bytes, value: bytes) -> None:
        """Bytes as they are: what a spool replays."""
        with self._lock:
            self.stats.sent += 1
        try:
            future = self._producer.send(topic, key=key, value=value)
        except KafkaError as exc:
            self._failed(topic, key, value, exc)
            return
        future.add_callback(self._delivered)
        future.add_errback(lambda exc: self._failed(topic, key, value, exc))

    def _delivered(self, _metadata: object) -> None:
        with self._lock:
            self.stats.delivered += 1

    def _failed(self, topic: str, key: bytes, value: bytes, exc: BaseException) -> None:
        with self._lock:
            self.stats.failed += 1
            first = self.stats.failed == 1
        if first:
            log.warning("Kafka did not take a record for %s: %r", topic, exc)
        if self.on_undelivered is not None:
            self.on_undelivered(topic, key, value, exc)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything sent so far is acknowledged or has failed."""
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            log.warning("flush did not finish: %r", exc)

    def close(self, timeout_s: float = 10.0) -> PublishStats:
        """Flush and close; what is still unacknowledged after `timeout_s` counts as failed."""
        self.flush(timeout_s)
        self._producer.close(timeout=timeout_s)
        with self._lock:
            unacknowledged = self.stats.sent - self.stats.delivered - self.stats.failed
            if unacknowledged > 0:
                self.stats.failed += unacknowledged
            return PublishStats(self.stats.sent, self.stats.delivered, self.stats.failed)
