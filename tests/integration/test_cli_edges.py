"""The command line's edges, against the real broker and the real store: a worker or an agent
never runs on a private broker, a publishing command never reports records the broker did
not acknowledge, and no store password reaches the console."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from gpuledger.broker import EmbeddedBroker, ensure_topics, running_broker
from gpuledger.runtime import Publisher, PublishError
from gpuledger.settings import Settings
from schema.topics import Topics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "agents" / "scenarios" / "demo.toml"


def gpuledger(
    *args: str, env: dict[str, str], timeout_s: float = 60, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuledger.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        **kwargs,  # type: ignore[arg-type]
    )


def bare_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEDGER_")}
    env.update(GPULEDGER_DATA_DIR=str(tmp_path / "data"), COLUMNS="300", **extra)
    return env


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with running_broker(Topics()) as running:
        yield running


def records_on(broker: EmbeddedBroker, topic: str, at_least: int, timeout_s: float = 15) -> list:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    consumer.seek_to_beginning(partition)
    got: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < at_least and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                got.extend(batch)
    finally:
        consumer.close()
    return got


# -- no private broker -------------------------------------------------------------------
@pytest.mark.parametrize(
    "command", [("worker",), ("agent", "--simulate", str(DEMO), "--duration", "5")]
)
def test_worker_and_agent_without_a_bootstrap_refuse_in_one_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    done = gpuledger(*command, env=bare_env(tmp_path, GPULEDGER_STORE=f"chdb://{tmp_path}/s"))
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "GPULEDGER_BOOTSTRAP" in lines[0] and "gpuledger up" in lines[0]
    # Nothing was started: no broker was advertised, no spool was filled.
    assert not (tmp_path / "data" / "broker.json").exists()
    assert not (tmp_path / "data" / "agent-spool").exists()


# -- acknowledgements --------------------------------------------------------------------
def test_records_the_broker_never_acknowledges_are_counted_and_raised(
    broker: EmbeddedBroker,
) -> None:
    settings = Settings(bootstrap=broker.bootstrap, publish_timeout_s=2)
    pub = Publisher(settings)
    pub.send("jobs", "first", b'{"v":1}')
    pub.producer.flush(timeout=10)  # the first is acknowledged while the broker answers
    broker.pause()
    try:
        pub.send("jobs", "second", b'{"v":1}')
        started = time.monotonic()
        with pytest.raises(PublishError) as failed:
            pub.close()
        waited = time.monotonic() - started
    finally:
        broker.resume()
    assert (failed.value.failed, failed.value.total) == (1, 2), str(failed.value)
    # Expired in the producer (KafkaTimeoutError) or timed out on the wire, as the race goes.
    assert str(failed.value).startswith("1 of 2 records failed: "), str(failed.value)
    assert "Timeout" in str(failed.value) or "TimedOut" in str(failed.value), str(failed.value)
    assert waited < 15, waited  # the publish timeout and the close, not two minutes


def test_replay_exits_4_saying_how_many_records_the_broker_did_not_take(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    topics = Topics(prefix="replay-pause.")
    ensure_topics(broker.bootstrap, topics)
    fifo = tmp_path / "records.jsonl"
    os.mkfifo(fifo)
    env = bare_env(
        tmp_path,
        GPULEDGER_BOOTSTRAP=broker.bootstrap,
        GPULEDGER_TOPIC_PREFIX=topics.prefix,
        GPULEDGER_PUBLISH_TIMEOUT_S="3",
    )
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    runner = threading.Thread(
        target=lambda: result.setdefault("done", gpuledger("replay", str(fifo), env=env))
    )
    runner.start()
    line = json.dumps({"topic": "jobs", "key": "j", "value": {"v": 1}}) + "\n"
    with fifo.open("w") as feed:
        feed.write(line)
        feed.flush()
        # The replay has reached the broker once (metadata, connection, first record)...
        assert len(records_on(broker, topics.jobs, 1)) == 1
        broker.pause()  # ...and then the broker stops answering
        try:
            feed.write(line)
            feed.write(line)
            feed.close()
            runner.join(timeout=60)
        finally:
            broker.resume()
    done = result["done"]
    assert done.returncode == 4, done.stdout + done.stderr  # one of three went through
    assert "2 of 3 records failed: KafkaTimeoutError" in " ".join(done.stderr.split())
    assert "replayed" not in done.stdout


def test_jobs_start_and_prices_load_report_success_only_when_acknowledged(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    topics = Topics(prefix="acked.")
    ensure_topics(broker.bootstrap, topics)
    env = bare_env(
        tmp_path, GPULEDGER_BOOTSTRAP=broker.bootstrap, GPULEDGER_TOPIC_PREFIX=topics.prefix
    )
    started = gpuledger("jobs", "start", "j1", "--team", "vision", env=env)
    assert started.returncode == 0, started.stderr
    assert "job j1 started" in started.stdout
    assert [r.key for r in records_on(broker, topics.jobs, 1)] == [b"j1"]
    loaded = gpuledger("prices", "load", env=env)
    assert loaded.returncode == 0, loaded.stderr
    published = int(loaded.stdout.split()[1])
    assert len(records_on(broker, topics.prices, published)) == published


def test_jobs_start_against_a_broker_that_does_not_answer_fails_in_one_line(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    env = bare_env(tmp_path, GPULEDGER_BOOTSTRAP=broker.bootstrap, GPULEDGER_PUBLISH_TIMEOUT_S="2")
    broker.pause()
    try:
        done = gpuledger("jobs", "start", "j2", env=env)
    finally:
        broker.resume()
    assert done.returncode != 0
    assert "started" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpuledger: "), done.stderr
