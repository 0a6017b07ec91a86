"""Kafka publishing for the agent: one `SampleBatch` per node and interval, keyed by node.

Values are the pydantic models as JSON (`encode`). The producer is idempotent with `acks=all`
and lz4 batches.

The agent does not talk to Kafka from its sampling loop: it appends every record to the
on-disk spool (`agents/spool.py`), and `SpoolSender` sends the spool's records from its own
thread, oldest first, one message in flight, merging a backlog of one node's batches into
larger `SampleBatch`es. While the broker is unreachable the producer retries the message in
flight with the same idempotence sequence (so a retry the broker already has is recognised as
a duplicate) and new samples wait on disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError
from pydantic import BaseModel

from gpuledger.agents.spool import Spool, SpoolRecord
from gpuledger.schema.messages import GpuSample, SampleBatch

log = logging.getLogger(__name__)


def encode(message: BaseModel) -> bytes:
    """The wire form of every gpuledger message: its JSON, written by pydantic-core."""
    return message.__pydantic_serializer__.to_json(message)


_SAMPLE_JSON = GpuSample.__pydantic_serializer__.to_json


@lru_cache(maxsize=4096)
def _batch_head(node: str) -> bytes:
    """`{"v":1,"node":NODE,"samples":[` as pydantic writes it (validating `node` once)."""
    empty = encode(SampleBatch(node=node, samples=[]))
    assert empty.endswith(b"[]}")
    return empty[:-2]


def encode_samples(node: str, samples: Sequence[GpuSample]) -> bytes:
    """The bytes of `encode(SampleBatch(node=node, samples=[s.model_dump(mode="json") ...]))`,
    written straight from the validated samples: no intermediate dicts, no second validation.
    """
    return _batch_head(node) + b",".join([_SAMPLE_JSON(s) for s in samples]) + b"]}"


class Publisher:
    """A kafka-python producer for the agent's topics."""

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str = "gpuledger-agent",
        linger_ms: int = 20,
        max_block_ms: int = 2000,
        **producer_config: Any,
    ) -> None:
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

    def send(self, topic: str, key: bytes, value: bytes) -> Any:
        """Hand one record to the producer; the future resolves when Kafka has it (or not)."""
        return self._producer.send(topic, key=key, value=value)

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait up to `timeout_s` for what was sent to be acknowledged, then close."""
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            log.warning("flush did not finish: %r", exc)
        self._producer.close(timeout=timeout_s)


def merge_sample_batches(values: Sequence[bytes]) -> bytes:
    """Several `SampleBatch` values of one node as one, samples in their order.

    ARCHITECTURE.md §2: when a spool drains, one message may hold several intervals.
    """
    first = orjson.loads(values[0])
    samples = list(first["samples"])
    for value in values[1:]:
        samples.extend(orjson.loads(value)["samples"])
    first["samples"] = samples
    return orjson.dumps(first)


@dataclass
class SenderStats:
    messages_sent: int = 0  # acknowledged by Kafka
    send_failures: int = 0  # a message Kafka did not take (it stays in the spool)
    connected: bool = False  # the last message went through, and none waits for long
    waiting_since: float | None = None  # monotonic time the message in flight was sent


# A message without an acknowledgement for this long means Kafka is not there (the producer
# keeps retrying it; the agent says so and counts the outage).
SLOW_ACK_S = 10.0


# What the sender's producer needs beyond Publisher's defaults: one message at a time, retried
# by the producer itself (same idempotence sequence) for as long as an outage may last.
SENDER_PRODUCER_CONFIG: dict[str, Any] = {
    "linger_ms": 0,
    "max_block_ms": 5000,
    "request_timeout_ms": 10_000,
    "delivery_timeout_ms": 600_000,
    "bootstrap_timeout_ms": 2000,
    "metrics_enabled": False,  # kafka-python's own metrics cost CPU on every send
}


class SpoolSender:
    """Sends what `spool` holds to Kafka, oldest first, from a thread of its own."""

    def __init__(
        self,
        spool: Spool,
        bootstrap: str,
        *,
        client_id: str = "gpuledger-agent",
        max_message_bytes: int = 512 * 1024,
        producer_config: dict[str, Any] | None = None,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.spool = spool
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.max_message_bytes = max_message_bytes
        self.producer_config = {**SENDER_PRODUCER_CONFIG, **(producer_config or {})}
        self.max_backoff_s = max_backoff_s
        self.stats = SenderStats()
        self._publisher: Publisher | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-sender", daemon=True)
        self._outage_since: float | None = None

    def start(self) -> SpoolSender:
        self._thread.start()
        return self

    def stop(self, drain_timeout_s: float = 10.0) -> bool:
        """Send what waits for up to `drain_timeout_s`, then stop; True when nothing is left.

        During an outage there is nothing to wait for: what waits stays in the spool.
        """
        if not self.stats.connected:
            drain_timeout_s = min(drain_timeout_s, 1.0)
        drained = self.spool.wait_empty(drain_timeout_s) if self._thread.is_alive() else False
        self._stop.set()
        self.spool.wake()
        self._thread.join(timeout=3)
        if self._publisher is not None:
            self._publisher.close(timeout_s=2)
            self._publisher = None
        return drained

    # -- the thread

    def _run(self) -> None:
        backoff = 0.25
        while not self._stop.is_set():
            if self._publisher is None and not self._connect():
                self._stop.wait(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
                continue
            records = self.spool.take(self.max_message_bytes, timeout_s=5.0)
            if not records:
                continue
            error = self._send(records)
            if error is None:
                self.spool.ack()
                self.stats.messages_sent += 1
                self._outage_over()
                backoff = 0.25
            elif self._stop.is_set():
                return  # leave it in the spool for the next start
            elif getattr(error, "retriable", True):
                self._outage(error)
                self._stop.wait(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
            else:
                self.spool.drop_inflight(repr(error))

    def _connect(self) -> bool:
        try:
            self._publisher = Publisher(
                self.bootstrap, client_id=self.client_id, **self.producer_config
            )
            return True
        except (KafkaError, OSError) as exc:
            self._outage(exc)
            return False

    def _send(self, records: list[SpoolRecord]) -> BaseException | None:
        first = records[0]
        value = (
            first.value if len(records) == 1 else merge_sample_batches([r.value for r in records])
        )
        done = threading.Event()
        outcome: list[BaseException | None] = []

        def finished(result: object) -> None:
            outcome.append(result if isinstance(result, BaseException) else None)
            done.set()

        assert self._publisher is not None
        try:
            future = self._publisher.send(first.topic, first.key, value)
        except KafkaError as exc:  # no metadata or no buffer within max_block_ms
            return exc
        future.add_callback(finished)
        future.add_errback(finished)
        self.stats.waiting_since = started = time.monotonic()
        try:
            while not done.wait(0.5):
                if self._stop.is_set():
                    return InterruptedError("stopping with a message in flight")
                if self.stats.connected and time.monotonic() - started > SLOW_ACK_S:
                    self._outage(
                        TimeoutError(f"no acknowledgement for {SLOW_ACK_S:.0f} s"), since=started
                    )
            return outcome[0]
        finally:
            self.stats.waiting_since = None

    def _outage(self, error: BaseException, since: float | None = None) -> None:
        self.stats.send_failures += 1
        self.stats.connected = False
        if self._outage_since is None:
            self._outage_since = since if since is not None else time.monotonic()
            log.warning(
                "Kafka at %s does not take records (%r): samples wait in the spool %s",
                self.bootstrap,
                error,
                self.spool.directory,
            )

    def _outage_over(self) -> None:
        self.stats.connected = True
        if self._outage_since is not None:
            log.info(
                "Kafka is back after %.0f s; sending the spool (%d samples waiting)",
                time.monotonic() - self._outage_since,
                self.spool.stats.backlog_samples,
            )
            self._outage_since = None
