"""The facts topic: a live feed of every stored fact (ARCHITECTURE.md §2); the store is the
record. Facts go in batches per partition, handed to the producer without waiting for the
broker: a `send()` awaited per record cost more than costing the fact.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from gpuledger.schema.messages import CostFact

log = logging.getLogger("gpuledger.worker")

FACTS_BATCH_BYTES = 512 * 1024  # under the broker's default 1 MiB message limit
_partitions_of_keys: dict[tuple[bytes, int], int] = {}


def _partition_for(key: bytes, partitions: list[int]) -> int:
    """The partition the producer's default partitioner gives `key` (remembered per GPU)."""
    found = _partitions_of_keys.get((key, len(partitions)))
    if found is None:
        found = DefaultPartitioner()(key, partitions, partitions)
        if len(_partitions_of_keys) < 1_000_000:
            _partitions_of_keys[(key, len(partitions))] = found
    return found


def _log_undelivered(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("facts topic: a batch of facts was not delivered (%s)", future.exception())


async def send_facts(producer: AIOKafkaProducer, topic: str, facts: Sequence[CostFact]) -> None:
    """Every fact as one record of the facts topic (key = GPU UUID, value = the `CostFact`
    JSON), appended to one batch per partition."""
    partitions = sorted(await producer.partitions_for(topic))
    batches: dict[int, Any] = {}
    for fact in facts:
        key = fact.gpu_uuid.encode()
        partition = _partition_for(key, partitions)
        batch = batches.get(partition)
        if batch is None:
            batch = batches[partition] = producer.create_batch()
        # A fact's __dict__ is its fields in the model's order: the JSON pydantic writes.
        value = orjson.dumps(fact.__dict__)
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
            sent = await producer.send_batch(batch, topic, partition=partition)
            sent.add_done_callback(_log_undelivered)
            batch = batches[partition] = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    for partition, batch in batches.items():
        sent = await producer.send_batch(batch, topic, partition=partition)
        sent.add_done_callback(_log_undelivered)
