"""Cost facts of a realistic fleet, made by the worker's own code (no broker needed): the
bench fleet's samples decoded by `gpuledger.streams.decode`, costed by
`gpuledger.ledger.state.MetadataState` with the packaged price book, stored by
`gpuledger.streams.sink.FactSink`. Larger tables are made from them in SQL (`replicate`): the same
fleet over a longer time."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

from bench._fleet import Fleet
from bench._rig import Store
from gpuledger.ledger.facts import FactBatch
from gpuledger.ledger.state import MetadataState
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import JobEvent, NodeInfo, UsageEvent
from gpuledger.schema.pricebook import load_gpu_models, load_price_book
from gpuledger.streams.decode import SampleDecoder
from gpuledger.streams.sink import FactSink

INSERT_EVERY = 200_000  # facts per insert (the worker's inserts are smaller; parts merge)


@dataclass
class Filled:
    samples: int = 0
    facts: int = 0
    raw_samples: int = 0
    gpus: int = 0
    jobs: int = 0
    seconds: float = 0.0
    span_s: float = 0.0
    state: MetadataState | None = None  # what the worker knew when it costed them


def fill(
    store: Store, fleet: Fleet, ticks: int, *, raw_ticks: int = 0, jitter: bool = True
) -> Filled:
    """`ticks` seconds of `fleet` as cost facts in `store` (and the first `raw_ticks` of them
    in samples_raw too); jobs, nodes, prices and usage stored as the worker stores them.

    `jitter`: every clone's utilization and power get their own NVML-like noise (whole
    percent, milliwatts), so that clones of one template node do not store the same values
    (which would compress as no real fleet does)."""
    started = time.monotonic()
    noise = random.Random(7)
    sink = FactSink(store.client)
    state = MetadataState(load_gpu_models())
    for entry in load_price_book():
        state.apply_price(entry)
    sink.upsert_prices(list(state.prices), time.time())
    decoder = SampleDecoder()
    out = Filled(gpus=fleet.gpus, span_s=ticks * fleet.interval_s)
    facts: list[list[Any]] = []
    raw: list = []
    usage: list[UsageEvent] = []
    for number, tick in enumerate(fleet.ticks(ticks)):
        for short, _key, value in tick.events:
            if short == "jobs":
                state.apply_job(JobEvent.model_validate_json(value))
            elif short == "nodes":
                state.apply_node(NodeInfo.model_validate_json(value))
            elif short == "usage":
                usage.append(UsageEvent.model_validate_json(value))
        for _key, value in tick.batches:
            samples = decoder.decode(value)
            if samples is None:
                raise ValueError(f"the bench fleet sent an invalid batch: {value[:200]!r}")
            if jitter:
                samples = [_jitter(s, noise) for s in samples]
            out.samples += len(samples)
            facts += state.cost_rows(samples)
            if number < raw_ticks:
                raw += samples
        if len(facts) >= INSERT_EVERY:
            sink.insert_facts(FactBatch(facts))
            out.facts += len(facts)
            facts = []
        if len(raw) >= INSERT_EVERY:
            sink.insert_raw(raw)
            out.raw_samples += len(raw)
            raw = []
    if facts:
        sink.insert_facts(FactBatch(facts))
        out.facts += len(facts)
    if raw:
        sink.insert_raw(raw)
        out.raw_samples += len(raw)
    sink.upsert_jobs(list(state.jobs.values()))
    sink.upsert_nodes(state.nodes())
    if usage:
        store.client.insert(
            "gpuledger.usage",
            [[to_ms(u.ts), u.job_id, u.requests, u.tokens] for u in usage],
            column_names=["ts", "job_id", "requests", "tokens"],
        )
    out.jobs = len(state.jobs)
    out.state = state
    out.seconds = time.monotonic() - started
    return out


def _jitter(sample: Any, noise: random.Random) -> Any:
    util = sample.util_sm
    if util is not None:
        util = min(1.0, max(0.0, round(util * 100 + noise.randint(-3, 3)) / 100))
    power = sample.power_w
    if power is not None:
        power = round(max(0.0, power * (1.0 + noise.gauss(0.0, 0.03))), 3)
    return msgspec.structs.replace(sample, util_sm=util, power_w=power)


def replicate(store: Store, copies: int, shift_s: float, *, since_copy: int = 1) -> int:
    """Copies `since_copy` .. `copies - 1` of the facts of the first `shift_s` seconds, copy k
    `k * shift_s` later: the same fleet over `copies` times as long (the rollups fill through
    their views). Returns the rows of cost_facts."""
    shift_ms = round(shift_s * 1000)
    first = store.client.query(
        "SELECT toUnixTimestamp64Milli(min(ts)) FROM gpuledger.cost_facts"
    ).result_rows[0][0]
    for copy in range(since_copy, copies):
        # `f.ts`, not `ts`: the REPLACE alias would shadow the column in WHERE.
        store.client.command(
            f"""INSERT INTO gpuledger.cost_facts
                SELECT * REPLACE (f.ts + toIntervalMillisecond({copy * shift_ms}) AS ts)
                FROM gpuledger.cost_facts AS f
                WHERE f.ts < fromUnixTimestamp64Milli({first + shift_ms}, 'UTC')""",
            settings={"insert_deduplicate": 0},
        )
    return store.count("SELECT count() FROM gpuledger.cost_facts")


def table_bytes(store: Store, table: str) -> tuple[int, int, int]:
    """(rows, bytes on disk, uncompressed bytes) of a table's active parts."""
    rows, on_disk, raw = store.client.query(
        """SELECT sum(rows), sum(bytes_on_disk), sum(data_uncompressed_bytes)
           FROM system.parts WHERE database = 'gpuledger' AND table = {t:String} AND active""",
        parameters={"t": table},
    ).result_rows[0]
    return int(rows or 0), int(on_disk or 0), int(raw or 0)


def column_bytes(store: Store, table: str) -> list[tuple[str, int]]:
    """(column, compressed bytes) of a table, largest first."""
    result = store.client.query(
        """SELECT name, data_compressed_bytes FROM system.columns
           WHERE database = 'gpuledger' AND table = {t:String}
           ORDER BY data_compressed_bytes DESC""",
        parameters={"t": table},
    )
    return [(str(n), int(b)) for n, b in result.result_rows]


def dumps(value: object) -> str:
    return orjson.dumps(value).decode()
