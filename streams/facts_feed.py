"""The facts topic: a live feed of every stored fact (ARCHITECTURE.md §2); the store is the
record. Facts go in batches per partition, handed to the producer without waiting for the
broker: a `send()` awaited per record cost more than costing the fact.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from gpuledger.ledger.facts import FactBatch, record_json

log = logging.getLogger("gpuledger.worker")

FACTS_BATCH_BYTES = 512 * 1024  # under the broker's default 1 MiB message limit
# Per partition count, each GPU's record key and the partition the producer's default
# partitioner gives it.
_placements: dict[int, dict[str, tuple[bytes, int]]] = {}
_PLACEMENTS_KEPT = 1_000_000


def _placement(gpu_uuid: str, partitions: list[int]) -> tuple[bytes, int]:
    """A GPU's record key and partition, remembered per GPU."""
    placed = _placements.setdefault(len(partitions), {})
    found = placed.get(gpu_uuid)
    if found is None:
        key = gpu_uuid.encode()
        found = (key, DefaultPartitioner()(key, partitions, partitions))
        if len(placed) < _PLACEMENTS_KEPT:
            placed[gpu_uuid] = found
    return found


def _log_undelivered(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("facts topic: a batch of facts was not delivered (%s)", future.exception())


async def send_facts(producer: AIOKafkaProducer, topic: str, facts: FactBatch) -> None:
    """Every fact as one record of the facts topic (key = GPU UUID, value = the `CostFact`
    JSON), appended to one batch per partition."""
    partitions = sorted(await producer.partitions_for(topic))
    placed = _placements.setdefault(len(partitions), {})
    batches: dict[int, Any] = {}
    for fact in facts.records():
        found = placed.get(fact.gpu_uuid)
        key, partition = found if found is not None else _placement(fact.gpu_uuid, partitions)
        batch = batches.get(partition)
        if batch is None:
            batch = batches[partition] = producer.create_batch()
        value = record_json(fact)
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
            sent = await producer.send_batch(batch, topic, partition=partition)
            sent.add_done_callback(_log_undelivered)
            batch = batches[partition] = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    for partition, batch in batches.items():
        sent = await producer.send_batch(batch, topic, partition=partition)
        sent.add_done_callback(_log_undelivered)
