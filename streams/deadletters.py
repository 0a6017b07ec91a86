"""Dead letters: a message (or one sample of it) the worker cannot take goes to the
dead-letter topic and the `deadletters` table with the reason, never silently away.

Letters are queued as they are decided and sent at the next flush, before the offsets of
the messages they came from are committed (ARCHITECTURE.md §2).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from gpuledger.ledger.joiner import Held
from gpuledger.schema.messages import DeadLetter
from gpuledger.streams.decode import sample_payloads
from gpuledger.streams.store_errors import PermanentStoreError

if TYPE_CHECKING:
    from gpuledger.streams.retries import StoreCalls
    from gpuledger.streams.sink import FactSink
    from gpuledger.streams.stats import WorkerStats

log = logging.getLogger("gpuledger.worker")

# A dead letter's reason and a log line quote at most this much of a value given (the
# envelope keeps the bytes), and a reason is at most REASON_MAX_CHARS long.
QUOTE_CHARS = 120
REASON_MAX_CHARS = 2000
# A dead letter larger than this goes to the topic with its value cut (the broker refuses
# records over 1 MiB); the deadletters table keeps it whole.
LETTER_MAX_BYTES = 900 * 1024

Letter = tuple[str, bytes | None, DeadLetter]  # the topic it came from, its key, the letter


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)`, cut to `limit` characters (saying how long it was) when longer."""
    if isinstance(value, (bytes, str)) and len(value) > 4 * limit:
        text = repr(value[: 2 * limit])  # never the repr of a megabyte to keep 120 of it
    else:
        text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value):,}" if isinstance(value, (bytes, str)) else f"{len(text):,} as text"
    return f"{text[:limit]}… ({size} long)"


def validation_reason(exc: ValidationError) -> str:
    """One line per error: the field path, what is wrong, the value given (its start)."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']} (got {quote(err.get('input'))})")
    return bounded("; ".join(parts))


def failure_reason(exc: BaseException) -> str:
    """The reason of a dead letter for any failure: pydantic's words for a refusal, else
    the exception's type and (the start of) its message."""
    if isinstance(exc, ValidationError):
        return validation_reason(exc)
    if isinstance(exc, PermanentStoreError):
        return bounded(f"refused by the store: {exc}")
    return bounded(f"{type(exc).__name__}: {exc}")


def bounded(text: str, limit: int = REASON_MAX_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def letter_key(letter: DeadLetter) -> tuple[str, int, int, int | None]:
    return letter.topic, letter.partition, letter.offset, letter.index


def letter_value(letter: DeadLetter) -> bytes:
    """The letter's JSON for the topic: its value cut to fit a record when too large (the
    deadletters table keeps it whole)."""
    value = letter.model_dump_json().encode()
    if len(value) <= LETTER_MAX_BYTES:
        return value
    keep = LETTER_MAX_BYTES // 2 // 4 * 4  # whole base64 quanta
    size = len(letter.value_b64) * 3 // 4
    cut = letter.model_copy(
        update={
            "value_b64": letter.value_b64[:keep],
            "error": f"{letter.error} [value cut to its first {keep * 3 // 4:,} of about "
            f"{size:,} bytes here; the deadletters table keeps it whole]",
        }
    )
    return cut.model_dump_json().encode()


class DeadLetters:
    """The letters decided since the last flush, and how they are sent."""

    def __init__(self, stats: WorkerStats, samples_topic: str, deadletter_topic: str) -> None:
        self.stats = stats
        self.samples_topic = samples_topic
        self.deadletter_topic = deadletter_topic
        self.pending: list[Letter] = []

    def take(self) -> list[Letter]:
        letters, self.pending = self.pending, []
        return letters

    def of_record(
        self,
        record: ConsumerRecord,
        error: str,
        *,
        index: int | None = None,
        raw: Any = None,
    ) -> None:
        """Dead-letter a message (or, with `index`, one sample `raw` of it)."""
        value = record.value
        if raw is not None:
            # A value orjson cannot write (an int past 64 bits) keeps its message's bytes.
            with contextlib.suppress(TypeError, orjson.JSONEncodeError):
                value = orjson.dumps(raw)
        error = bounded(error)
        letter = DeadLetter(
            value_b64=base64.b64encode(value or b"").decode(),
            error=error,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            ts=time.time(),
            index=index,
        )
        self.pending.append((record.topic, record.key, letter))
        self.stats.deadletters += 1
        log.warning(
            "dead letter from %s[%d]@%d%s: %s",
            record.topic,
            record.partition,
            record.offset,
            "" if index is None else f" sample {index}",
            error,
        )

    def of_sample(self, held: Held, exc: Exception) -> None:
        """Dead-letter one sample that cannot be stored or costed (its raw JSON as value)."""
        if isinstance(exc, PermanentStoreError):
            self.stats.refused_by_store += 1
        sample = held.sample
        (payload,) = sample_payloads([sample])
        letter = DeadLetter(
            value_b64=base64.b64encode(payload).decode(),
            error=bounded(
                f"sample of {quote(sample.gpu_uuid)} at {sample.ts!r}: {failure_reason(exc)}"
            ),
            topic=self.samples_topic,
            partition=held.partition,
            offset=held.offset,
            ts=time.time(),
        )
        self.pending.append((letter.topic, sample.gpu_uuid.encode(), letter))
        self.stats.deadletters += 1
        log.warning(
            "dead letter from %s[%d]@%d: %s",
            letter.topic,
            held.partition,
            held.offset,
            letter.error,
        )

    async def send(
        self,
        letters: list[Letter],
        producer: AIOKafkaProducer | None,
        sink: FactSink,
        calls: StoreCalls,
    ) -> None:
        """To the topic (delivery awaited, retried) and then to the table; a letter stored
        before (a message replayed after a crash) is not sent again."""
        if not letters:
            return
        assert producer is not None
        known = await calls.run(sink.stored_deadletter_keys, [d for _, _, d in letters])
        letters = [x for x in letters if letter_key(x[2]) not in known]
        if not letters:
            return
        pending = letters
        delay = 0.5
        while pending:
            # Delivery is awaited: a letter the broker did not take is sent again, never lost.
            failed = await self._publish(producer, pending)
            if failed:
                log.warning(
                    "%d dead letters not accepted by the broker; retrying in %.1f s",
                    len(failed),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            pending = failed
        await calls.run(sink.insert_deadletters, [d for _, _, d in letters])

    async def _publish(self, producer: AIOKafkaProducer, letters: list[Letter]) -> list[Letter]:
        """Send the letters; return those the broker did not take."""
        outcomes: list[Any] = []
        for _topic, key, letter in letters:
            try:
                outcomes.append(
                    await producer.send(self.deadletter_topic, key=key, value=letter_value(letter))
                )
            except KafkaError as exc:
                outcomes.append(exc)
        results = await asyncio.gather(
            *(o for o in outcomes if isinstance(o, asyncio.Future)), return_exceptions=True
        )
        delivered = iter(results)
        return [
            x
            for x, o in zip(letters, outcomes, strict=True)
            if not isinstance(o, asyncio.Future) or isinstance(next(delivered), Exception)
        ]
