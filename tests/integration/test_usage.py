"""Usage events through a real `gpuledger worker`: cost per 1,000 inferences from published
`UsageEvent`s and the samples of the GPUs an inference job holds, computed here by hand from
the price the rig publishes, never read back from the code; then the same answer after
re-sent events, re-batched replays, two replicas reporting one second, bad messages and a
worker killed mid-stream."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from gpuledger.schema.messages import JobEvent, JobState, JobType, UsageEvent
from gpuledger.schema.migrate import migrate
from gpuledger.streams.sink import FactSink
from gpuledger.streams.usage import usage_key
from tests.faults.rig import T0, USD_PER_H100_HOUR, Rig, sample
from tests.support import rows, scalar, wait_until

pytestmark = pytest.mark.integration

DAY = 86_400


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("usage"))
    try:
        rig.worker("w1")
        yield rig
    finally:
        rig.close()


def start_inference_job(rig: Rig, job_id: str, gpus: list[str], t0: float) -> None:
    rig.sender.send(
        "jobs",
        job_id,
        JobEvent(
            ts=t0,
            job_id=job_id,
            state=JobState.running,
            team="search",
            project="ranker",
            job_type=JobType.inference,
            gpu_uuids=gpus,
            started_at=t0,
        ),
    )


def send_samples(rig: Rig, node: str, gpus: list[str], t0: float, seconds: int) -> None:
    for s in range(seconds):
        samples = [sample(gpu, node, t0 + s) for gpu in gpus]
        rig.sender.send("samples", node, {"v": 1, "node": node, "samples": samples})
    rig.sender.flush()


def send_usage(rig: Rig, events: list[UsageEvent]) -> None:
    for event in events:
        rig.sender.send("usage", event.job_id, event)
    rig.sender.flush()


def reports(job_id: str, source: str, t0: float, count: int, base: int) -> list[UsageEvent]:
    """`count` reports of one replica, one every 10 s from t0 + 10."""
    return [
        UsageEvent(
            ts=t0 + 10 * (i + 1),
            job_id=job_id,
            source=source,
            requests=base + i,
            tokens=(base + i) * 120,
        )
        for i in range(count)
    ]


def unit_cost(client: Client, job_id: str) -> dict[str, Any] | None:
    result = client.query(
        "SELECT cost_usd, requests, tokens, usd_per_1k_requests, usd_per_1m_tokens "
        "FROM gpuledger.inference_unit_cost WHERE job_id = {j:String}",
        parameters={"j": job_id},
    )
    found = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
    assert len(found) <= 1, found
    return found[0] if found else None


def usage_rows(client: Client, job_id: str) -> tuple[int, int]:
    """(rows, Σ requests) of a job in the usage table itself."""
    found = rows(
        client,
        "SELECT count(), sum(requests) FROM gpuledger.usage WHERE job_id = {j:String}",
        j=job_id,
    )
    return int(found[0][0]), int(found[0][1])


def wait_unit_cost(client: Client, job_id: str, usd: float, requests: int) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        row = unit_cost(client, job_id)
        ok = (
            row is not None
            and abs(row["cost_usd"] - usd) <= 1e-9 * usd
            and row["requests"] >= requests
        )
        return row if ok else None

    return wait_until(probe, timeout_s=90, what=f"{job_id}: ${usd:.6f} and {requests} requests")


def barrier(rig: Rig, name: str) -> None:
    """A fresh event behind everything sent so far: once it is stored (one partition, read
    in order), the worker has taken every earlier usage message."""
    send_usage(rig, [UsageEvent(ts=T0, job_id=f"barrier-{name}", requests=1)])
    wait_until(
        lambda: usage_rows(rig.client, f"barrier-{name}")[0] == 1,
        timeout_s=60,
        what=f"the barrier {name}",
    )


def test_cost_per_thousand_inferences_is_the_hand_computed_figure_and_survives_resends(
    rig: Rig,
) -> None:
    t0 = T0 + 1000
    gpus = ["GPU-serve-0", "GPU-serve-1"]
    start_inference_job(rig, "serve-1", gpus, t0)
    rig.sender.flush()
    send_samples(rig, "serve-node", gpus, t0, 120)
    usd = 2 * 120 * USD_PER_H100_HOUR / 3600

    pod_a = reports("serve-1", "pod-a", t0, 12, base=100)
    pod_b = reports("serve-1", "pod-b", t0, 12, base=40)
    # The two replicas report the same seconds, and pod-b's reports arrive after pod-a's are
    # stored (in other batches): both count.
    send_usage(rig, pod_a)
    wait_until(lambda: usage_rows(rig.client, "serve-1")[0] == 12, what="pod-a's reports")
    send_usage(rig, pod_b)
    requests = sum(range(100, 112)) + sum(range(40, 52))
    tokens = requests * 120
    row = wait_unit_cost(rig.client, "serve-1", usd, requests)
    assert row["requests"] == requests
    assert row["tokens"] == tokens
    assert row["usd_per_1k_requests"] == pytest.approx(1000 * usd / requests, rel=1e-9)
    assert row["usd_per_1m_tokens"] == pytest.approx(1e6 * usd / tokens, rel=1e-9)
    assert usage_rows(rig.client, "serve-1") == (24, requests)

    # Sent again as they were, then replayed in other batches (reversed, a slice of each
    # replica interleaved with a new report): only the new report counts.
    send_usage(rig, pod_a + pod_b)
    late = UsageEvent(ts=t0 + 125, job_id="serve-1", source="pod-a", requests=9, tokens=90)
    send_usage(rig, [*reversed(pod_b), pod_a[3], late, *pod_a[4:9], pod_b[2]])
    barrier(rig, "resend")
    assert usage_rows(rig.client, "serve-1") == (25, requests + 9)
    again = unit_cost(rig.client, "serve-1")
    assert again is not None
    assert again["requests"] == requests + 9
    assert again["usd_per_1k_requests"] == pytest.approx(1000 * usd / (requests + 9), rel=1e-9)


def test_bad_usage_messages_are_dead_lettered_with_the_reason_and_the_good_ones_stored(
    rig: Rig,
) -> None:
    t0 = T0 + 2000
    good = reports("serve-2", "pod-a", t0, 3, base=10)
    send_usage(rig, good[:1])
    rig.sender.send("usage", "serve-2", b"{not json")
    rig.sender.send("usage", "serve-2", {"v": 1, "ts": t0, "job_id": "serve-2", "requests": -4})
    rig.sender.send("usage", "serve-2", {"v": 1, "ts": t0, "requests": 4})
    send_usage(rig, good[1:])
    wait_until(lambda: usage_rows(rig.client, "serve-2") == (3, 33), what="the good reports")
    letters = wait_until(
        lambda: (
            rows(
                rig.client,
                "SELECT offset, error FROM gpuledger.deadletters "
                "WHERE topic = 'gpuledger.usage' ORDER BY offset",
            )
            if scalar(
                rig.client,
                "SELECT count() FROM gpuledger.deadletters WHERE topic = 'gpuledger.usage'",
            )
            >= 3
            else None
        ),
        what="three usage dead letters",
    )
    assert len(letters) == 3, letters
    errors = [e for _, e in letters]
    assert "Invalid JSON" in errors[0]
    assert "requests" in errors[1] and "-4" in errors[1]
    assert "job_id" in errors[2] and "Field required" in errors[2]


def test_a_worker_killed_mid_stream_restarts_and_counts_every_report_once(rig: Rig) -> None:
    t0 = T0 + 3000
    gpus = [f"GPU-kill-serve-{g}" for g in range(4)]
    start_inference_job(rig, "serve-kill", gpus, t0)
    rig.sender.flush()
    send_samples(rig, "kill-serve-node", gpus, t0, 60)
    usd = 4 * 60 * USD_PER_H100_HOUR / 3600
    # Three replicas, a report each every 10 ms of event time: 3 x 1000 reports, sent as
    # agents would, about 300 a second.
    events = [
        UsageEvent(
            ts=t0 + i / 100,
            job_id="serve-kill",
            source=f"pod-{r}",
            requests=1 + (i * 7 + r) % 13,
            tokens=50 + i % 11,
        )
        for i in range(1000)
        for r in range(3)
    ]
    assert len({usage_key(e) for e in events}) == len(events)
    requests = sum(e.requests for e in events)
    tokens = sum(e.tokens for e in events)

    error: list[BaseException] = []

    def stream() -> None:
        try:
            for n, event in enumerate(events):
                rig.sender.send("usage", event.job_id, event)
                if n % 30 == 29:
                    time.sleep(0.1)
            rig.sender.flush()
        except BaseException as exc:  # reported below
            error.append(exc)

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    wait_until(
        lambda: usage_rows(rig.client, "serve-kill")[0] >= 600,
        timeout_s=60,
        every_s=0.1,
        what="a fifth of the reports stored",
    )
    assert rig.workers[-1].stop(signal.SIGKILL) == -signal.SIGKILL
    stored_at_kill = usage_rows(rig.client, "serve-kill")[0]
    assert 0 < stored_at_kill < len(events)
    rig.worker("w1")
    sender.join(120)
    assert not sender.is_alive() and not error, error
    # The agents re-send everything after the restart (a spool replayed whole).
    send_usage(rig, events)
    wait_unit_cost(rig.client, "serve-kill", usd, requests)
    barrier(rig, "kill")
    print(f"killed with {stored_at_kill:,} of {len(events):,} reports stored")
    assert usage_rows(rig.client, "serve-kill") == (len(events), requests)
    after = unit_cost(rig.client, "serve-kill")
    assert after is not None
    assert (after["requests"], after["tokens"]) == (requests, tokens)
    assert after["usd_per_1k_requests"] == pytest.approx(1000 * usd / requests, rel=1e-9)


def test_the_worker_log_has_no_tracebacks(rig: Rig) -> None:
    for worker in rig.workers:
        assert "Traceback" not in worker.log()


# -- the store -------------------------------------------------------------------------------
def test_the_store_knows_which_usage_identities_it_holds(ch: Client) -> None:
    migrate(ch)
    sink = FactSink(ch)
    stored = [
        UsageEvent(ts=T0 + 0.25, job_id="j", source="pod-a", requests=1),
        UsageEvent(ts=T0 + 0.25, job_id="j", source="pod-b", requests=2),
        UsageEvent(ts=T0 + DAY, job_id="j", requests=3),
    ]
    sink.insert_usage(stored)
    asked = [
        *(usage_key(e) for e in stored),
        ("j", "pod-c", round((T0 + 0.25) * 1000)),
        ("j", "pod-a", round((T0 + 0.26) * 1000)),
        ("other", "", round((T0 + DAY) * 1000)),
    ]
    assert sink.stored_usage_keys(asked) == {usage_key(e) for e in stored}
    # A retried insert of the same rows is stored once.
    sink.insert_usage(stored)
    assert scalar(ch, "SELECT count() FROM gpuledger.usage") == 3
