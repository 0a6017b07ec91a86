"""The command line's edges, against the real broker and the real store: a worker or an agent
never runs on a private broker, a publishing command never reports records the broker did
not acknowledge, and no store password reaches the console."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from gpuledger import broker as broker_module
from gpuledger.broker import EmbeddedBroker, ensure_topics, listens_on
from gpuledger.runtime import Publisher, PublishError
from gpuledger.schema.migrate import migrate
from gpuledger.schema.topics import Topics
from gpuledger.settings import Settings
from tests.support import ROOT, run_gpuledger

pytestmark = pytest.mark.integration

DEMO = ROOT / "agents" / "scenarios" / "demo.toml"


def gpuledger(
    *args: str, env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return run_gpuledger(*args, env=env, timeout_s=timeout_s)


def bare_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEDGER_")}
    env.update(GPULEDGER_DATA_DIR=str(tmp_path / "data"), COLUMNS="300", **extra)
    return env


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


def test_an_agent_given_a_bootstrap_that_names_no_broker_refuses_in_one_line(
    tmp_path: Path,
) -> None:
    done = gpuledger(
        "agent",
        "--simulate",
        str(DEMO),
        "--duration",
        "5",
        "--metrics-port",
        "0",
        env=bare_env(tmp_path, GPULEDGER_BOOTSTRAP="kafka:port"),
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "--bootstrap 'kafka:port'" in lines[0] and "is not HOST:PORT" in lines[0]


# -- the broker's port -------------------------------------------------------------------
@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process's listener holds (not a broker: it never answers Kafka)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_a_broker_asked_for_a_taken_port_says_so_in_one_line(
    tmp_path: Path, taken_port: int
) -> None:
    done = gpuledger("broker", "--port", str(taken_port), env=bare_env(tmp_path), timeout_s=30)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{taken_port} is taken by another process" in lines[0], lines[0]


def test_a_picked_port_taken_before_the_broker_binds_it_is_picked_again(
    taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process may take the free port between our pick and the broker's bind: the
    broker must not mistake that listener for itself."""
    picks = iter([taken_port])
    real_pick = broker_module.free_port
    monkeypatch.setattr(
        broker_module, "free_port", lambda host: next(picks, None) or real_pick(host)
    )
    with EmbeddedBroker() as started:
        assert started.port != taken_port
        assert started.process is not None
        assert listens_on(started.process.pid, started.port)
        assert not listens_on(started.process.pid, taken_port)
        assert listens_on(os.getpid(), taken_port)


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


def test_replay_through_a_pipe_to_a_broker_that_stopped_answering_fails_whole(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The file is read and checked first (a pipe is held in memory), then sent: a broker
    that stopped answering gets none of it, and the command says how many failed."""
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
    line = json.dumps({"topic": "jobs", "key": "j", "value": {"v": 1}}) + "\n"
    broker.pause()
    try:
        runner.start()
        with fifo.open("w") as feed:
            feed.write(line * 3)
        runner.join(timeout=60)
    finally:
        broker.resume()
    done = result["done"]
    assert done.returncode == 3, done.stdout + done.stderr
    assert "replayed" not in done.stdout
    assert "Kafka" in done.stderr or "3 of 3 records failed" in " ".join(done.stderr.split())
    assert records_on(broker, topics.jobs, 1, timeout_s=2) == []


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
        done = gpuledger("jobs", "start", "j2", "--gpu", "GPU-j2", env=env)
    finally:
        broker.resume()
    assert done.returncode != 0
    assert "started" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("connecting to Kafka at "), done.stderr
    assert len(lines) == 2 and lines[1].startswith("gpuledger: "), done.stderr


def test_replay_checks_the_whole_file_first_and_publishes_all_or_nothing(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    topics = Topics(prefix="replay-check.")
    ensure_topics(broker.bootstrap, topics)
    env = bare_env(
        tmp_path, GPULEDGER_BOOTSTRAP=broker.bootstrap, GPULEDGER_TOPIC_PREFIX=topics.prefix
    )
    good = json.dumps({"topic": "jobs", "key": "j", "value": {"v": 1}})
    lines = [
        good,
        '[{"topic": "jobs", "value": {}}]',
        '{"topic": "nowhere", "value": {}}',
        '{"topic": "jobs"',
        good,
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    refused = gpuledger("replay", str(path), env=env)
    assert refused.returncode == 2, refused.stderr
    said = " ".join(refused.stderr.split())
    assert "3 bad lines" in said and "nothing published" in said and "--skip-bad" in said
    assert "line 2: a JSON array; each line must be one object" in said
    assert "line 3: unknown topic 'nowhere'" in said and "line 4: not JSON" in said
    assert "list indices" not in said
    assert records_on(broker, topics.jobs, 1, timeout_s=2) == []

    skipped = gpuledger("replay", "--skip-bad", str(path), env=env)
    assert skipped.returncode == 0, skipped.stderr
    assert "replayed 2 records" in skipped.stdout and "skipped 3 bad lines" in skipped.stdout
    assert len(records_on(broker, topics.jobs, 2)) == 2


def test_odd_publishing_input_is_said_out_loud(
    broker: EmbeddedBroker, tmp_path: Path, store_url: str, ch: Any
) -> None:
    migrate(ch)
    topics = Topics(prefix="odd.")
    ensure_topics(broker.bootstrap, topics)
    env = bare_env(
        tmp_path,
        GPULEDGER_BOOTSTRAP=broker.bootstrap,
        GPULEDGER_TOPIC_PREFIX=topics.prefix,
        GPULEDGER_STORE=store_url,
    )
    started = gpuledger("jobs", "start", "label-only", "--team", "nlp", env=env)
    assert started.returncode == 0, started.stderr
    assert "names no --gpu" in started.stderr and "GPULEDGER_JOB_ID=label-only" in started.stderr
    assert "started on 0 GPUs" in started.stdout
    finished = gpuledger("jobs", "finish", "never-seen", env=env)
    assert finished.returncode == 0, finished.stderr
    assert "the store knows no job never-seen yet" in " ".join(finished.stderr.split())
    header_only = tmp_path / "book.csv"
    header_only.write_text(
        "provider,region,gpu_model,pricing_model,usd_per_gpu_hour,effective_from\n"
    )
    loaded = gpuledger("prices", "load", str(header_only), env=env)
    assert loaded.returncode == 2 and "holds no price" in loaded.stderr
    assert records_on(broker, topics.prices, 1, timeout_s=2) == []
