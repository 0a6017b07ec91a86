"""10,000 malformed messages mixed into 100,000 good ones: each bad one is dead-lettered once,
with its reason and its source offset; every good sample is costed once."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator

import orjson
import pytest

from gpuledger.schema.messages import JobEvent, JobState
from tests.faults.rig import T0, USD_PER_H100_HOUR, Fleet, Rig, sample, until
from tests.support import rows

pytestmark = pytest.mark.integration

GOOD_PER_BAD = 10


def malformed(node: str, i: int) -> bytes:
    """Five ways a message goes wrong, in turn."""
    kind = i % 5
    if kind == 0:
        return b"{not json"
    if kind == 1:  # cut off in transit
        return orjson.dumps({"v": 1, "node": node, "samples": [sample("GPU-x", node, T0)]})[:40]
    if kind == 2:
        return orjson.dumps({"v": 99, "node": node, "samples": []})
    if kind == 3:
        return orjson.dumps({"v": 1, "node": node, "samples": "none today"})
    # A well-formed batch whose only sample is not: dead-lettered alone, with its index.
    bad = sample(f"GPU-badone-{i}", node, T0 + i, util=1.7)
    return orjson.dumps({"v": 1, "node": node, "samples": [bad]})


def mixed(fleet: Fleet, seconds: int) -> Iterator[tuple[str, bytes]]:
    for i, (node, value) in enumerate(fleet.batches(T0, seconds)):
        yield node, value
        if i % GOOD_PER_BAD == GOOD_PER_BAD - 1:
            yield node, malformed(node, i // GOOD_PER_BAD)


def test_ten_thousand_malformed_messages_among_a_hundred_thousand_good_ones(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig("bad")
    worker = rig.worker()
    fleet = Fleet("bad", nodes=100, gpus=1)
    seconds = 1000
    sent = fleet.samples_in(seconds)
    messages = rig.send_batches(mixed(fleet, seconds))
    bad_sent = messages - sent
    assert (sent, bad_sent) == (100_000, 10_000)
    rig.wait_stored(f"GPU-{fleet.prefix}-", sent, timeout_s=180)
    topic = rig.topics.samples

    def letters() -> tuple[int, int]:
        return rig.dead_letters(topic)

    until(lambda: letters()[0] >= bad_sent, 60, f"{bad_sent:,} dead letters")
    distinct, stored_rows = letters()
    row = rig.row("10k malformed among 100k good", fleet, sent, dead_lettered=distinct)
    rig.assert_exact(fleet, row, USD_PER_H100_HOUR)
    assert distinct == bad_sent and stored_rows == bad_sent  # each once, none twice
    # Each letter says why, and where the message was.
    reasons = rows(
        rig.client,
        "SELECT idx IS NULL, any(error), count() FROM gpuledger.deadletters "
        "WHERE topic = {t:String} GROUP BY idx IS NULL ORDER BY 1",
        t=topic,
    )
    (sample_level, sample_error, per_sample), (_, _, whole) = reasons
    assert not sample_level and per_sample == bad_sent // 5 and whole == bad_sent - per_sample
    assert "util_sm" in sample_error and "1.7" in sample_error
    one = rows(
        rig.client,
        "SELECT offset, value_b64 FROM gpuledger.deadletters "
        "WHERE topic = {t:String} AND idx IS NULL AND position(error, 'Invalid JSON') > 0 "
        "ORDER BY offset LIMIT 1",
        t=topic,
    )
    offset, value = one[0]
    assert base64.b64decode(value) == b"{not json"
    assert offset == GOOD_PER_BAD  # the 11th message on the partition
    assert worker.proc is not None and worker.proc.poll() is None

    # Valid but hostile label values are data, never SQL: stored and read back as they came.
    hostile = "x'); DROP TABLE gpuledger.cost_facts; -- {p:String} \\ \"été 🚀"
    rig.sender.send(
        "jobs",
        "bad-hostile",
        JobEvent(
            ts=T0,
            job_id="bad-hostile",
            state=JobState.running,
            team=hostile,
            project=hostile,
            labels={hostile: hostile},
            gpu_uuids=[fleet.gpu(0, 0)],
            started_at=T0,
        ),
    )
    rig.sender.flush()
    until(
        lambda: (
            rows(
                rig.client,
                "SELECT team, project, gpu_seconds FROM gpuledger.job_costs "
                "WHERE job_id = 'bad-hostile'",
            )
            == [(hostile, hostile, float(seconds))]
        ),
        60,
        "the hostile job's facts",
    )
    # The jobs row is written in the same flush as the facts, after them: wait for it too.
    until(
        lambda: (
            rows(rig.client, "SELECT labels FROM gpuledger.jobs FINAL WHERE job_id = 'bad-hostile'")
            == [({hostile: hostile},)]
        ),
        60,
        "the hostile job's labels",
    )
    # Moving a GPU's 1,000 samples to the job moved dollars, and made or lost none.
    assert rig.tally(f"GPU-{fleet.prefix}-") == (sent, 0, 0)
    facts_usd, rollup_usd = rig.dollars(f"GPU-{fleet.prefix}-", f"{fleet.prefix}-node")
    assert facts_usd == pytest.approx(sent * USD_PER_H100_HOUR / 3600, rel=1e-9)
    assert rollup_usd == pytest.approx(facts_usd, rel=1e-9)
