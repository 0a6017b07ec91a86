"""The ceiling of this machine for the worker's job: consume the samples topic with
aiokafka, decode each message with orjson, insert one plain row per sample through
clickhouse-connect into the same store, commit. No Faust, no cost model, no dedup.

Run as its own process, like the worker: `python -m bench._bare BOOTSTRAP STORE_URL TOPIC GROUP`.
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

from gpuledger.store import connect

TABLE = "bench_bare.samples"
DDL = [
    "CREATE DATABASE IF NOT EXISTS bench_bare",
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        ts DateTime64(3, 'UTC'), node LowCardinality(String), gpu_uuid String,
        util_sm Nullable(Float32), mem_used_bytes UInt64, power_w Nullable(Float32)
    ) ENGINE = MergeTree ORDER BY (gpu_uuid, ts)""",
]
COLUMNS = ["ts", "node", "gpu_uuid", "util_sm", "mem_used_bytes", "power_w"]


def prepare(store_url: str) -> None:
    client = connect(store_url)
    for statement in DDL:
        client.command(statement)
    client.command(f"TRUNCATE TABLE {TABLE}")


class _SayAssigned(ConsumerRebalanceListener):
    async def on_partitions_revoked(self, revoked: object) -> None:
        return None

    async def on_partitions_assigned(self, assigned: object) -> None:
        print("assigned", flush=True)  # the benchmark's clock starts here, as at "worker ready"


def samples_consumer(bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    """A consumer of `topic` from its start, committing by hand, that prints "assigned"."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    consumer.subscribe([topic], listener=_SayAssigned())
    return consumer


async def consume(bootstrap: str, store_url: str, topic: str, group: str) -> None:
    client = connect(store_url)
    consumer = samples_consumer(bootstrap, topic, group)
    await consumer.start()
    columns: list[list[object]] = [[] for _ in COLUMNS]
    ts, node, gpu, util, mem, power = columns
    flushed = time.monotonic()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            for records in batches.values():
                for record in records:
                    for sample in orjson.loads(record.value)["samples"]:
                        ts.append(round(sample["ts"] * 1000))
                        node.append(sample["node"])
                        gpu.append(sample["gpu_uuid"])
                        util.append(sample["util_sm"])
                        mem.append(sample["mem_used_bytes"])
                        power.append(sample["power_w"])
            # As the worker does: an insert every 0.2 s (or sooner when 20,000 rows wait).
            if ts and (len(ts) >= 20_000 or not batches or time.monotonic() - flushed >= 0.2):
                flushed = time.monotonic()
                await asyncio.to_thread(
                    client.insert, TABLE, columns, column_names=COLUMNS, column_oriented=True
                )
                for column in columns:
                    column.clear()
                await consumer.commit()
    finally:
        await consumer.stop()


def main(argv: list[str]) -> int:
    bootstrap, store_url, topic, group = argv
    asyncio.run(consume(bootstrap, store_url, topic, group))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
