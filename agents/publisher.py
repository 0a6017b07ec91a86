"""Kafka publishing for the agent: one `SampleBatch` per node and interval, keyed by node.

Values are the pydantic models as JSON (`encode`). The producer is idempotent with `acks=all`
and lz4 batches.

The agent does not talk to Kafka from its sampling loop: it appends every record to the
on-disk spool (`agents/spool.py`), and `SpoolSender` sends the spool's records from its own
thread, oldest first, one message in flight, merging a backlog of one node's batches into
larger `SampleBatch`es, through a producer that sends and waits in that thread
(`agents/producer.py`). While the broker is unreachable the sender retries the message in
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

import orjson
from pydantic import BaseModel

from gpuledger.agents.kafka_wire import KafkaError
from gpuledger.agents.producer import BatchProducer
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
    waiting_since: float | None = None  # monotonic time the message in flight was first sent


# A message without an acknowledgement for this long means Kafka is not there: the sender says
# so, counts the outage and sends the message again (same idempotence sequence).
SLOW_ACK_S = 10.0


class SpoolSender:
    """Sends what `spool` holds to Kafka, oldest first, from a thread of its own."""

    def __init__(
        self,
        spool: Spool,
        bootstrap: str,
        *,
        client_id: str = "gpuledger-agent",
        max_message_bytes: int = 512 * 1024,
        request_timeout_s: float = SLOW_ACK_S,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.spool = spool
        self.bootstrap = bootstrap
        self.max_message_bytes = max_message_bytes
        self.max_backoff_s = max_backoff_s
        self.stats = SenderStats()
        # ValueError here, before any thread: a bootstrap that names no broker.
        self._producer = BatchProducer(
            bootstrap, client_id=client_id, request_timeout_s=request_timeout_s
        )
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
        self._producer.interrupt()  # a message in flight fails now and stays in the spool
        self._thread.join(timeout=3)
        self._producer.close()
        return drained

    # -- the thread

    def _run(self) -> None:
        backoff = 0.25
        while not self._stop.is_set():
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
                self.stats.waiting_since = None
                self.spool.drop_inflight(repr(error))

    def _send(self, records: list[SpoolRecord]) -> BaseException | None:
        first = records[0]
        value = (
            first.value if len(records) == 1 else merge_sample_batches([r.value for r in records])
        )
        if self.stats.waiting_since is None:  # its first try: retries wait on from there
            self.stats.waiting_since = time.monotonic()
        try:
            self._producer.send(first.topic, first.key, value)
        except KafkaError as exc:
            return exc
        except Exception as exc:  # a fault of ours must not end the sender: the record stays
            if self._outage_since is None:
                log.exception("sending to %s failed unexpectedly", first.topic)
            return exc
        self.stats.waiting_since = None
        return None

    def _outage(self, error: BaseException) -> None:
        self.stats.send_failures += 1
        self.stats.connected = False
        if self._outage_since is None:
            self._outage_since = time.monotonic()
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
