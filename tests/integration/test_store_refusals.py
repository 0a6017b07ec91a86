"""Store errors told apart (streams/store_errors.py), on errors the real store and client
raise, and what the worker's flush does with rows the store refuses for good: it splits the
batch, dead-letters the messages of those rows, stores the rest and lets the offsets move."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

import pytest
from aiokafka.structs import ConsumerRecord
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from gpuledger.schema.messages import GpuSample, JobEvent
from gpuledger.schema.migrate import migrate
from gpuledger.store import connect, stop_owned_stores
from gpuledger.streams.config import WorkerConfig
from gpuledger.streams.pipeline import CostPipeline
from gpuledger.streams.sink import FactSink
from gpuledger.streams.store_errors import error_code, is_permanent
from tests.support import rows

pytestmark = pytest.mark.integration

T0 = 1_767_225_600.0
H100 = "NVIDIA H100 80GB HBM3"


def _raised(call: object) -> Exception:
    try:
        call()  # type: ignore[operator]
    except Exception as exc:
        return exc
    raise AssertionError("the store took it")


def test_the_stores_own_errors_are_told_apart(ch: Client) -> None:
    migrate(ch)
    usage = ["ts", "job_id", "requests", "tokens"]
    # Values the client cannot write into their columns: permanent.
    too_big = _raised(lambda: ch.insert("gpuledger.usage", [[0, "j", 2**64, 0]], usage))
    too_late = _raised(
        lambda: ch.insert("gpuledger.usage", [[int(1.7e21), "j", 1, 0]], column_names=usage)
    )
    surrogate = _raised(lambda: ch.insert("gpuledger.usage", [[0, "j\ud800", 1, 0]], usage))
    # What the server refuses to parse: permanent, by its code.
    unparsable = _raised(lambda: ch.command("SELECT toDateTime64('soon', 3)"))
    thrown = _raised(lambda: ch.command("SELECT throwIf(1, 'refused')"))
    assert error_code(unparsable) == 41 and error_code(thrown) == 395
    for exc in (too_big, too_late, surrogate, unparsable, thrown):
        assert is_permanent(exc), repr(exc)
    # A store that does not answer: transient.
    away = _raised(
        lambda: connect("clickhouse://default:@127.0.0.1:9/gpuledger").command("SELECT 1")
    )
    assert not is_permanent(away), repr(away)
    # Codes that pass with time, in the words ClickHouse uses for them.
    for text in (
        "Code: 252. DB::Exception: Too many parts (300). (TOO_MANY_PARTS)",
        "Code: 159. DB::Exception: Timeout exceeded. (TIMEOUT_EXCEEDED)",
        "Code: 210. DB::NetException: Connection refused. (NETWORK_ERROR)",
        "Code: 241. DB::Exception: Memory limit exceeded. (MEMORY_LIMIT_EXCEEDED)",
    ):
        assert not is_permanent(DatabaseError(text)), text
    assert is_permanent(DatabaseError("Code: 53. DB::Exception: Type mismatch. (TYPE_MISMATCH)"))


def _pipeline(ch: Client, tmp_path: Path) -> CostPipeline:
    migrate(ch)
    return CostPipeline(
        WorkerConfig(data_dir=tmp_path, bootstrap="127.0.0.1:9"),
        lambda: FactSink(ch),
        publish_facts=False,
    )


def _record(topic: str, offset: int, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(
        topic=topic,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value),
        headers=(),
    )


def test_a_sample_the_store_cannot_take_is_dead_lettered_and_the_rest_stored(
    ch: Client, tmp_path: Path
) -> None:
    pipeline = _pipeline(ch, tmp_path)
    good = [GpuSample(ts=T0 + i, node="n", gpu_uuid="g", gpu_name=H100) for i in range(7)]
    # Past the contract (built without it): more bytes than a UInt64 column holds.
    bad = GpuSample.model_construct(
        **{**good[0].__dict__, "mem_used_bytes": 2**64, "gpu_uuid": "bad"}
    )
    for offset, sample in enumerate([*good[:3], bad, *good[3:]]):
        pipeline.joiner.offer([sample], 0, offset, 0.0)
    due = pipeline.joiner.due(0.0, flush_all=True)

    asyncio.run(pipeline._store_samples(due))

    assert rows(ch, "SELECT count() FROM gpuledger.cost_facts WHERE gpu_uuid = 'g'") == [(7,)]
    assert rows(ch, "SELECT count() FROM gpuledger.cost_facts WHERE gpu_uuid = 'bad'") == [(0,)]
    ((_, _, letter),) = pipeline.letters.pending
    assert (letter.offset, letter.index) == (3, None)
    assert "refused by the store" in letter.error and "'bad'" in letter.error
    assert b'"gpu_uuid":"bad"' in base64.b64decode(letter.value_b64)
    assert pipeline.joiner.committable() == {0: 8}  # nothing waits on the refused one
    assert pipeline.stats.refused_by_store == 1


def test_a_job_row_the_store_cannot_take_is_dead_lettered_and_the_others_stored(
    ch: Client, tmp_path: Path
) -> None:
    """`gpuledger jobs start J --at <nanoseconds>` as a row: the insert can never succeed."""
    pipeline = _pipeline(ch, tmp_path)
    topic = pipeline.topics.jobs
    for offset, (job_id, started_at) in enumerate(
        [("a", T0), ("ns", T0 * 1e9), ("b", T0), ("c", T0)]
    ):
        event = JobEvent.model_construct(
            v=1, ts=T0, job_id=job_id, state=None, team=None, project=None, job_type=None,
            experiment_id=None, gpu_uuids=["g"], started_at=started_at, ended_at=None,
            labels=None,
        )  # fmt: skip
        pipeline.state.apply_job(event)
        pipeline.metadata.dirty_jobs[job_id] = pipeline.state.jobs[job_id]
        pipeline.metadata.sources[("jobs", job_id)] = _record(
            topic, offset, event.model_dump_json().encode()
        )

    asyncio.run(pipeline.metadata.store())

    stored = rows(ch, "SELECT job_id FROM gpuledger.jobs FINAL ORDER BY job_id")
    assert stored == [("a",), ("b",), ("c",)]
    ((_, _, letter),) = pipeline.letters.pending
    assert letter.topic == topic and letter.offset == 1
    assert letter.error.startswith("refused by the store")


def test_a_worker_that_cannot_store_says_where_it_stands(
    ch: Client, store_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = _pipeline(ch, tmp_path)
    pipeline.joiner.offer([], 0, 40, 0.0)
    sample = GpuSample(ts=T0, node="n", gpu_uuid="g", gpu_name=H100)
    pipeline.joiner.offer([sample], 0, 41, 0.0)  # held, not stored: the place to resume
    pipeline.metadata.next_offsets[(pipeline.topics.jobs, 0)] = 7
    stop_owned_stores(Path(store_url.removeprefix("chdb://")))

    async def store_for_a_while() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pipeline.run_with_retries(pipeline.sink.load_progress), 1.5)

    with caplog.at_level(logging.WARNING, logger="gpuledger.worker"):
        asyncio.run(store_for_a_while())
    stalls = [r.getMessage() for r in caplog.records if "stalled" in r.getMessage()]
    # Once a minute at most: one line, however many retries.
    assert len(stalls) == 1, stalls
    assert "load_progress keeps failing" in stalls[0]
    assert f"{pipeline.topics.samples}[0]@41" in stalls[0]
    assert f"{pipeline.topics.jobs}[0]@7" in stalls[0]
