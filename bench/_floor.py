"""The floor of the worker's own job on this machine: the bare loop (`bench/_bare.py`) plus what
every feature-complete worker must do per sample whatever its cost model, done the way the
worker does it, and nothing else.

Per message: consume with aiokafka, decode with the worker's decoder (msgspec). Per sample: one
fact row, a copy of a fixed row with the sample's own values set (what the worker's cheapest
costing path does: no job, price or node lookups). Every 0.2 s: the raw samples and the facts
inserted with the worker's `FactSink` into a migrated store (same tables, same Arrow and
deduplication tokens), the facts feed published with the worker's `send_facts`, the offsets
committed. No dedup, joins, observers or corrections.

Run as its own process, like the worker: `python -m bench._floor BOOTSTRAP STORE_URL PREFIX GROUP`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from bench._bare import samples_consumer
from gpuledger.ledger.facts import AT, FactBatch
from gpuledger.ledger.state import MetadataState
from gpuledger.schema.messages import IdleBasis
from gpuledger.schema.pricebook import load_gpu_models
from gpuledger.schema.topics import Topics
from gpuledger.store import connect
from gpuledger.streams.decode import SampleDecoder
from gpuledger.streams.facts_feed import FACTS_BATCH_BYTES, send_facts
from gpuledger.streams.sink import FactSink

_TS, _GPU, _NODE = AT["ts"], AT["gpu_uuid"], AT["node"]
_UTIL, _MEM, _POWER, _SM = AT["util_sm"], AT["mem_used_bytes"], AT["power_w"], AT["sm_active"]


def fixed_row(sample: Any) -> list[Any]:
    """A valid fact row to copy: the sample costed with no metadata known."""
    state = MetadataState(load_gpu_models(), 0.05, IdleBasis.busy_time)
    return state.cost_rows([sample])[0]


async def consume(bootstrap: str, store_url: str, prefix: str, group: str) -> None:
    topics = Topics(prefix)
    sink = FactSink(connect(store_url))
    decoder = SampleDecoder()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, acks="all", max_batch_size=FACTS_BATCH_BYTES
    )
    consumer = samples_consumer(bootstrap, topics.samples, group)
    await producer.start()
    await consumer.start()
    samples: list[Any] = []
    rows: list[list[Any]] = []
    template: list[Any] | None = None
    flushed = time.monotonic()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            for records in batches.values():
                for record in records:
                    decoded = decoder.decode(record.value)
                    if decoded is None:
                        raise SystemExit(f"offset {record.offset}: not a valid SampleBatch")
                    for sample in decoded:
                        if template is None:
                            template = fixed_row(sample)
                        row = template.copy()
                        row[_TS] = sample.ts
                        row[_GPU] = sample.gpu_uuid
                        row[_NODE] = sample.node
                        row[_UTIL] = sample.util_sm
                        row[_MEM] = sample.mem_used_bytes
                        row[_POWER] = sample.power_w or 0.0
                        row[_SM] = sample.sm_active
                        rows.append(row)
                    samples += decoded
            if samples and (
                len(samples) >= 20_000 or not batches or time.monotonic() - flushed >= 0.2
            ):
                flushed = time.monotonic()
                facts = FactBatch(rows)
                await asyncio.to_thread(sink.insert_raw, samples)
                await asyncio.to_thread(sink.insert_facts, facts)
                await send_facts(producer, topics.facts, facts)
                samples, rows = [], []
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(consume(*sys.argv[1:]))
