"""A hostile-input campaign through the real worker: hypothesis draws hostile messages for the
samples, jobs, prices, nodes and usage topics (non-finite and huge numbers, times at and beyond the
contract's bounds, wrong types, truncated JSON, invalid UTF-8, JSON nested 100,000 deep,
empty and null values, megabyte strings, 10,000-process samples, unknown schema versions),
sent between good samples whose dollars are known.

Every good sample must be stored exactly once, every hostile message the contract refuses
dead-lettered once with a reason (and no other message), every odd-but-valid one (a label
to normalise, a time at a bound) stored, and the worker must never exit: not while it reads
them, not when it starts over them, not when it stops.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gpuledger.schema.messages import EPOCH_MAX_S, EPOCH_MIN_S, LABEL_MAX_CHARS
from tests.faults.rig import T0, USD_PER_H100_HOUR, Fleet, Rig, sample
from tests.support import rows, wait_until

pytestmark = pytest.mark.integration

HOLE = "@@hostile@@"
MEGABYTE = b'"' + b"m" * 900_000 + b'"'  # a megabyte-sized string (under the 1 MiB record)
DEEP = b"[" * 100_000 + b"]" * 100_000
NOT_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]
BAD_TIMES = [
    *NOT_FINITE,
    b"-1e308",
    b"1e308",
    b"-0.001",
    repr(EPOCH_MAX_S).encode(),  # the first time refused
    repr(EPOCH_MAX_S + 0.5).encode(),
    b"9.3e15",  # past what a millisecond integer of a double holds
    b"1767225600000",  # milliseconds
    b"1767225600000000000",  # nanoseconds
    b'"2026-01-01"',
    b"[]",
    b"{}",
    DEEP,
]
BAD_COUNTS = [b"-1", b"18446744073709551616", b"1e999", b"NaN", b"1.5", b'"many"', b"[]"]
WRONG_TYPES = [b"[]", b"{}", b"true", b"12", DEEP]

# (field path, tokens that the contract refuses there), per topic.
REFUSED_FIELDS: dict[str, list[tuple[tuple[Any, ...], list[bytes]]]] = {
    "samples": [
        (("ts",), [*BAD_TIMES, b"null"]),
        (("util_sm",), [*NOT_FINITE, b"-1e308", b"1.0000001", b"-0.5", b"9.3e15", b'"x"']),
        (("interval_s",), [*NOT_FINITE, b"0", b"-1", b"3600.5", b"1e308"]),
        (("mem_used_bytes",), BAD_COUNTS),
        (("gpu_index",), [b"-1", b"4294967296", b"NaN", b"1e999"]),
        (("power_w",), [*NOT_FINITE, b"-1e308", b"-1"]),
        (("temp_c",), NOT_FINITE),
        (("processes", 0, "pid"), [b"-1", b"4294967296", b"NaN", b"1e999"]),
        (("processes", 0, "util_sm"), [*NOT_FINITE, b"2"]),
        (("v",), [b"2", b"99", b"0", b"null", b'"1"']),
        (("node",), [b"null", b"12", MEGABYTE]),
        (("gpu_uuid",), [b'""', b"null", MEGABYTE]),
        (("processes",), [b'"none"', b"[1]", DEEP]),
    ],
    "jobs": [
        (("ts",), BAD_TIMES),
        (("started_at",), BAD_TIMES),
        (("ended_at",), BAD_TIMES),
        (("job_id",), [b'""', b"null", b"5", b'"\\u0001\\u0002"', b"[]"]),
        (("state",), [b'"exploded"', b"1", b"[]"]),
        (("gpu_uuids",), [b'"GPU-1"', b"[1]", b"[" + MEGABYTE + b"]"]),
        (("labels",), [b'{"k": 5}', b"[]", b'"k=v"']),
        (("v",), [b"2", b"null"]),
    ],
    "prices": [
        (("usd_per_gpu_hour",), [*NOT_FINITE, b"-1", b'"free"', b"null"]),
        (("effective_from",), BAD_TIMES),
        (("pricing_model",), [b'"barter"', b"null", b"3"]),
        (("gpu_model",), [b'""', MEGABYTE]),
        (("v",), [b"2"]),
    ],
    "nodes": [
        (("ts",), BAD_TIMES),
        (("usd_per_gpu_hour",), [*NOT_FINITE, b"-1", b'"cheap"']),
        (("node",), [b"null", MEGABYTE]),
        (("pricing_model",), [b'"barter"']),
        (("v",), [b"7"]),
    ],
    "usage": [
        (("ts",), [*BAD_TIMES, b"null"]),
        (("requests",), BAD_COUNTS),
        (("tokens",), BAD_COUNTS),
        (("job_id",), [b'""', b"null", b"5", b'"\\u0001"', b"[]"]),
        (("v",), [b"2", b"null"]),
    ],
}
# Odd but within the contract: normalised or at a bound, and stored.
STORED_FIELDS: dict[str, list[tuple[tuple[Any, ...], list[bytes]]]] = {
    "samples": [
        (("processes", 0, "labels", "team"), [b'"a\\u0000b\\u001b[31m"', MEGABYTE, b'"\\u0085"']),
        (("processes", 0, "name"), [b'"py\\u0007thon"', MEGABYTE]),
        (("ts",), [repr(EPOCH_MIN_S).encode(), repr(EPOCH_MAX_S - 1).encode()]),
        (("temp_c",), [b"-1e308", b"1e308"]),
    ],
    "jobs": [
        (("team",), [b'"a\\u0000b"', MEGABYTE]),
        (("labels",), [b'{"k\\u0007": "v\\u009f", "x": ""}']),
        (("started_at",), [repr(EPOCH_MIN_S).encode(), repr(EPOCH_MAX_S - 1).encode()]),
    ],
    "prices": [
        (("effective_from",), [b"0", repr(EPOCH_MAX_S - 1).encode()]),
    ],
    "nodes": [
        (("ts",), [repr(EPOCH_MAX_S - 1).encode()]),
    ],
    "usage": [
        (("source",), [b'"pod\\u0000-a"', MEGABYTE]),
        (("requests",), [b"0", b"18446744073709551615"]),
    ],
}
MANGLED = ["truncated", "invalid utf-8", "deep", "empty", "null value", "json null", "array"]


@dataclass(frozen=True)
class Hostile:
    topic: str
    value: bytes | None
    refused: bool
    what: str


def _base(topic: str, n: int) -> dict[str, Any]:
    """A valid message of `topic`, on names no good data uses (what it costs is not counted)."""
    if topic == "samples":
        one = sample(f"GPU-hxv-{n}", "hx-node", T0 + n)
        one["processes"] = [{"pid": 7, "name": "python", "labels": {"team": "hx"}}]
        return {"v": 1, "node": "hx-node", "samples": [one]}
    if topic == "jobs":
        return {
            "v": 1,
            "ts": T0,
            "job_id": f"hx-job-{n}",
            "state": "running",
            "gpu_uuids": ["GPU-hx-none"],
            "started_at": T0,
        }
    if topic == "prices":
        return {
            "v": 1,
            "provider": "hx-cloud",
            "region": "hx",
            "gpu_model": "A100",
            "pricing_model": "on_demand",
            "usd_per_gpu_hour": 1.0,
            "effective_from": T0 + n,
        }
    if topic == "usage":
        return {"v": 1, "ts": T0 + n, "job_id": f"hx-usage-{n}", "requests": 3, "tokens": 5}
    return {"v": 1, "ts": T0 + n, "node": f"hx-node-{n}", "provider": "hx-cloud", "region": "hx"}


def _with(topic: str, n: int, path: tuple[Any, ...], token: bytes) -> bytes:
    """The base message with the field at `path` (of its sample, for samples) set to the raw
    JSON `token`."""
    message = _base(topic, n)
    target = message["samples"][0] if topic == "samples" else message
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = HOLE
    return orjson.dumps(message).replace(orjson.dumps(HOLE), token)


def hostile_case(topic: str) -> st.SearchStrategy[Callable[[int], Hostile]]:
    """A hostile message of `topic`, as a function of a number that keeps it unique."""
    refused = st.sampled_from(REFUSED_FIELDS[topic]).flatmap(
        lambda ft: st.tuples(st.just(ft[0]), st.sampled_from(ft[1]), st.just(True))
    )
    stored = st.sampled_from(STORED_FIELDS[topic]).flatmap(
        lambda ft: st.tuples(st.just(ft[0]), st.sampled_from(ft[1]), st.just(False))
    )

    def field_case(case: tuple[tuple[Any, ...], bytes, bool]) -> Callable[[int], Hostile]:
        path, token, is_refused = case
        what = f"{'.'.join(map(str, path))}={token[:24]!r}"
        return lambda n: Hostile(topic, _with(topic, n, path, token), is_refused, what)

    @st.composite
    def mangled(draw: st.DrawFn) -> Callable[[int], Hostile]:
        kind = draw(st.sampled_from(MANGLED))
        cut = draw(st.floats(0.05, 0.95))

        def make(n: int) -> Hostile:
            good = orjson.dumps(_base(topic, n))
            value: bytes | None = {
                "truncated": good[: int(len(good) * cut)],
                "invalid utf-8": good.replace(b'"hx', b'"\xff\xfehx', 1),
                "deep": DEEP,
                "empty": b"",
                "null value": None,
                "json null": b"null",
                "array": b"[]",
            }[kind]
            return Hostile(topic, value, True, kind)

        return make

    cases = [refused.map(field_case), stored.map(field_case), mangled()]
    if topic == "samples":
        cases.append(st.booleans().map(_many_processes))
    return st.one_of(*cases)


def _many_processes(bad_last: bool) -> Callable[[int], Hostile]:
    """A sample of 10,000 processes, the last of them refused or not."""

    def make(n: int) -> Hostile:
        message = _base("samples", n)
        processes = [{"pid": p, "util_sm": 0.0001} for p in range(10_000)]
        if bad_last:
            processes[-1]["pid"] = -1
        message["samples"][0]["processes"] = processes
        return Hostile("samples", orjson.dumps(message), bad_last, "10,000 processes")

    return make


def draw_hostile(topic: str, count: int) -> list[Hostile]:
    """`count` hostile messages of `topic`, drawn by hypothesis with a fixed seed."""
    makers: list[Callable[[int], Hostile]] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(hostile_case(topic))
    def collect(make: Callable[[int], Hostile]) -> None:
        makers.append(make)

    collect()
    return [make(n) for n, make in enumerate(makers)]


@dataclass
class Campaign:
    rig: Rig
    sent: dict[str, int]
    refused_offsets: dict[str, set[int]]
    kept_offsets: dict[str, set[int]]
    hostile: int = 0
    futures: list[Any] | None = None

    def send(self, topic: str, key: str, value: bytes | None) -> int:
        offset = self.sent[topic]
        self.sent[topic] += 1
        future = self.rig.sender.producer.send(
            self.rig.topics.name(topic), key=key.encode(), value=value
        )
        assert self.futures is not None
        self.futures.append(future)
        return offset

    def send_hostile(self, message: Hostile) -> None:
        offset = self.send(message.topic, f"hx-{self.hostile}", message.value)
        self.hostile += 1
        (self.refused_offsets if message.refused else self.kept_offsets)[message.topic].add(offset)

    def flush(self) -> None:
        self.rig.sender.flush()
        assert self.futures is not None
        for future in self.futures:
            future.get(timeout=30)  # every message reached the broker, in order
        self.futures = []


def mix(fleet: Fleet, t_from: float, seconds: int, hostile: list[Hostile]) -> Iterator[Any]:
    """Good batches in time order, a hostile message after every few."""
    good = list(fleet.batches(t_from, seconds))
    every = max(len(good) // max(len(hostile), 1), 1)
    bad = iter(hostile)
    for i, item in enumerate(good):
        yield item
        if i % every == every - 1:
            yield next(bad, None)
    yield from bad


def test_hostile_messages_on_every_topic_never_stop_the_worker(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig("hostile")
    topics = ["samples", "jobs", "prices", "nodes", "usage"]
    campaign = Campaign(
        rig,
        sent={"samples": 0, "jobs": 0, "prices": 1, "nodes": 0, "usage": 0},  # prices[0]: the rig's
        refused_offsets={t: set() for t in topics},
        kept_offsets={t: set() for t in topics},
        futures=[],
    )
    drawn = {"samples": 240, "jobs": 90, "prices": 60, "nodes": 60, "usage": 60}
    per_topic = [draw_hostile(t, drawn[t]) for t in topics]
    # The topics interleaved: one of each in turn while each has some left.
    hostile = [m for turn in itertools.zip_longest(*per_topic) for m in turn if m is not None]
    half = len(hostile) // 2
    fleet = Fleet("hg", nodes=20, gpus=1)
    seconds = 120

    def send_mix(t_from: float, secs: int, bad: list[Hostile]) -> None:
        for item in mix(fleet, t_from, secs, bad):
            if isinstance(item, Hostile):
                campaign.send_hostile(item)
            elif item is not None:
                campaign.send("samples", item[0], item[1])
        campaign.flush()

    # Half before the worker starts (it reads the metadata topics from their start), half
    # while it runs.
    send_mix(T0, seconds // 2, hostile[:half])
    worker = rig.worker()
    started = time.monotonic()
    send_mix(T0 + seconds // 2, seconds - seconds // 2, hostile[half:])
    good = fleet.samples_in(seconds)
    prefix = f"GPU-{fleet.prefix}-"

    # The longest time good data waited with nothing of it stored, until all of it was.
    stall, last_change, stored = 0.0, time.monotonic(), -1
    deadline = time.monotonic() + 150
    while stored < good and time.monotonic() < deadline:
        now_stored = rig.tally(prefix)[0]
        now = time.monotonic()
        if now_stored != stored:
            stored, last_change = now_stored, now
        stall = max(stall, now - last_change)
        assert worker.proc is not None and worker.proc.poll() is None, worker.log()[-3000:]
        time.sleep(0.2)
    drained_s = time.monotonic() - started

    refused = sum(len(o) for o in campaign.refused_offsets.values())
    kept = sum(len(o) for o in campaign.kept_offsets.values())

    def lettered() -> dict[str, set[int]]:
        found = rows(
            rig.client,
            "SELECT topic, groupUniqArray(offset) FROM gpuledger.deadletters GROUP BY topic",
        )
        by_short = {rig.topics.name(t): t for t in topics}
        return {by_short.get(t, t): set(offsets) for t, offsets in found}

    wait_until(
        lambda: sum(len(lettered().get(t, set())) for t in topics) >= refused,
        timeout_s=60,
        every_s=0.5,
        what=f"{refused} dead letters",
    )
    letters = lettered()
    for topic in topics:
        assert letters.get(topic, set()) == campaign.refused_offsets[topic], topic
    # Once each, each with its reason.
    (total, distinct, without_reason, longest) = rows(
        rig.client,
        "SELECT count(), uniqExact(topic, partition, offset, ifNull(idx, 4294967295)), "
        "countIf(error = ''), max(length(error)) FROM gpuledger.deadletters",
    )[0]
    assert total == distinct == refused and without_reason == 0
    assert longest <= 2300, "a reason quotes a bounded prefix of the value"
    # The odd-but-valid samples are stored, once each; so are the good ones.
    kept_samples = len(campaign.kept_offsets["samples"])
    wait_until(
        lambda: rig.tally("GPU-hxv-")[0] >= kept_samples,
        timeout_s=30,
        every_s=0.5,
        what=f"{kept_samples} odd-but-valid samples",
    )
    assert rig.tally("GPU-hxv-") == (kept_samples, 0, 0)
    kept_usage = len(campaign.kept_offsets["usage"])
    usage_sql = "SELECT count() FROM gpuledger.usage WHERE job_id LIKE 'hx-usage-%'"
    wait_until(
        lambda: rows(rig.client, usage_sql)[0][0] >= kept_usage,
        timeout_s=30,
        every_s=0.5,
        what=f"{kept_usage} odd-but-valid usage events",
    )
    assert rows(rig.client, usage_sql)[0][0] == kept_usage
    facts_usd, _ = rig.dollars(prefix, f"{fleet.prefix}-node")
    assert rig.tally(prefix) == (good, 0, 0)
    assert facts_usd == pytest.approx(good * USD_PER_H100_HOUR / 3600, rel=1e-9)
    # Normalised labels are stored normalised.
    teams = {t for (t,) in rows(rig.client, "SELECT DISTINCT team FROM gpuledger.jobs FINAL")}
    assert all(len(t) <= LABEL_MAX_CHARS and "\x00" not in t for t in teams)

    # A stop drains and exits 0; a start over all of it is ready, and stores what comes next.
    first_exit = worker.stop(signal.SIGTERM)
    again = rig.worker("w2")
    send_mix(T0 + seconds, 10, [])
    rig.wait_stored(prefix, good + fleet.samples_in(10), timeout_s=60)
    assert rig.tally(prefix) == (good + fleet.samples_in(10), 0, 0)
    assert rig.dead_letters(rig.topics.samples)[0] == len(campaign.refused_offsets["samples"])
    assert again.proc is not None and again.proc.poll() is None
    exits = 0 if first_exit == 0 else 1
    row = rig.row(
        f"{campaign.hostile} hostile on 5 topics, restart",
        fleet,
        good + fleet.samples_in(10),
        dead_lettered=distinct,
    )
    rig.assert_exact(fleet, row, USD_PER_H100_HOUR)

    table = [
        ("hostile messages sent", f"{campaign.hostile:,} ({refused:,} refused, {kept:,} odd)"),
        ("good samples sent", f"{good + fleet.samples_in(10):,}"),
        ("good samples stored exactly once", f"{rig.tally(prefix)[0]:,}"),
        ("refused messages dead-lettered once, with a reason", f"{distinct:,} of {refused:,}"),
        ("odd-but-valid samples stored once", f"{rig.tally('GPU-hxv-')[0]:,} of {kept_samples}"),
        ("odd-but-valid usage events stored once", f"{kept_usage} of {kept_usage}"),
        ("worker exits (SIGTERM exit code 0 is not one)", str(exits)),
        ("longest stall of good data", f"{stall:.1f} s (all stored {drained_s:.0f} s after start)"),
    ]
    width = max(len(k) for k, _ in table)
    print("\n| what | count |\n|---|---|")
    for key, value in table:
        print(f"| {key.ljust(width)} | {value} |")
    assert exits == 0, f"the worker exited with {first_exit}"
