"""Wiring shared by the commands: finding the broker and the store, publishing, running
the worker and the agent. The parts themselves live in agents/, streams/ and schema/.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from gpuledger.broker import EmbeddedBroker, ensure_topics, wait_for_port
from gpuledger.replay import ReplaySource
from gpuledger.schema.cluster import CLIENT_SETTINGS
from gpuledger.schema.messages import PriceEntry
from gpuledger.schema.topics import Topics
from gpuledger.settings import Settings
from gpuledger.store import pid_alive

if TYPE_CHECKING:
    from gpuledger.agents.config import AgentConfig

log = logging.getLogger("gpuledger")


# -- the broker ------------------------------------------------------------------------
def broker_file(settings: Settings) -> Path:
    return settings.data_dir / "broker.json"


def running_embedded_broker(settings: Settings) -> str | None:
    """The bootstrap of an embedded broker that `up` or `broker` runs now, if any."""
    path = broker_file(settings)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not pid_alive(int(info.get("pid", 0))):
        return None
    host, _, port = str(info["bootstrap"]).partition(":")
    try:
        wait_for_port(host, int(port), timeout_s=1.0)
    except Exception:
        return None
    return str(info["bootstrap"])


def resolve_bootstrap(
    settings: Settings, *, start: bool = False
) -> tuple[str, EmbeddedBroker | None]:
    """GPULEDGER_BOOTSTRAP, else the embedded broker that `up` or `broker` runs now.

    Only `up` may `start` a broker of its own: a worker or an agent on a private in-memory
    broker would lose everything it was sent when it exits, so they refuse instead.
    """
    if settings.bootstrap:
        return settings.bootstrap, None
    found = running_embedded_broker(settings)
    if found:
        return found, None
    if not start:
        raise SystemExit(
            "no Kafka broker: set GPULEDGER_BOOTSTRAP (or --bootstrap), "
            "or start one with `gpuledger broker` or `gpuledger up`"
        )
    broker = EmbeddedBroker().start()
    atexit.register(broker.stop)
    advertise_broker(settings, broker)
    ensure_topics(broker.bootstrap, Topics(settings.topic_prefix))
    return broker.bootstrap, broker


def advertise_broker(settings: Settings, broker: EmbeddedBroker) -> None:
    path = broker_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bootstrap": broker.bootstrap, "pid": os.getpid()}))

    def forget() -> None:
        with contextlib.suppress(OSError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()

    atexit.register(forget)


def run_broker(settings: Settings, *, port: int = 0, partitions: int = 1) -> int:
    console = Console(stderr=True, soft_wrap=True)
    broker = EmbeddedBroker(port=port).start()
    try:
        advertise_broker(settings, broker)
        created = ensure_topics(broker.bootstrap, Topics(settings.topic_prefix), partitions)
        console.print(
            f"broker: listening on {broker.bootstrap} (memory only: a restart empties it); "
            f"created {len(created)} topics. Others find it via {broker_file(settings)}, "
            f"or set GPULEDGER_BOOTSTRAP={broker.bootstrap}. Ctrl-C to stop."
        )
        _wait_for_signal()
    finally:
        broker.stop()
    return 0


def _wait_for_signal() -> None:
    stop = {"now": False}

    def handler(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop["now"]:
        time.sleep(0.2)


# -- the store -------------------------------------------------------------------------
def connect_store(settings: Settings) -> Any:
    from gpuledger.store import connect

    url = settings.store_url()
    if url.startswith("chdb://"):
        Path(url.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    if settings.store_cluster:
        return connect(url, settings=dict(CLIENT_SETTINGS))
    return connect(url)


# -- publishing ------------------------------------------------------------------------
CONNECT_TIMEOUT_MS = 10_000
"""How long a publishing command waits for the broker to answer at all."""


class PublishError(Exception):
    """Records the broker did not acknowledge: how many of how many, and the first reason."""

    def __init__(self, failed: int, total: int, reason: str) -> None:
        super().__init__(f"{failed} of {total} records failed: {reason}")
        self.failed = failed
        self.total = total


class Publisher:
    """A kafka-python producer for the command line's sends (acks=all).

    Leaving the `with` block waits for the broker's acknowledgement of every record and
    raises `PublishError` when some never came, so that no command reports records the
    broker refused or never saw.
    """

    def __init__(self, settings: Settings) -> None:
        from kafka import KafkaProducer

        bootstrap, _ = resolve_bootstrap(settings)
        self.topics = Topics(settings.topic_prefix)
        self.timeout_s = settings.publish_timeout_s
        timeout_ms = max(int(self.timeout_s * 1000), 100)
        linger_ms = 10
        print(f"connecting to Kafka at {bootstrap} …", file=sys.stderr, flush=True)
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=linger_ms,
            compression_type="lz4",
            # An unreachable broker fails in seconds; an acknowledgement may take longer.
            bootstrap_timeout_ms=min(timeout_ms, CONNECT_TIMEOUT_MS),
            max_block_ms=min(timeout_ms, CONNECT_TIMEOUT_MS),
            request_timeout_ms=max(timeout_ms - linger_ms, 1),
            delivery_timeout_ms=timeout_ms,
        )
        self.sent = 0
        self.acked = 0
        self.failed = 0
        self.first_failure: str | None = None
        self._unreachable: str | None = None
        # Acknowledgements are counted on the producer's I/O thread, refusals on both.
        self._counting = threading.Lock()

    def _fail(self, reason: object) -> None:
        named = isinstance(reason, Exception)
        with self._counting:
            self.failed += 1
            if self.first_failure is None:
                self.first_failure = f"{type(reason).__name__}: {reason}" if named else str(reason)

    def _ack(self, _metadata: object) -> None:
        with self._counting:
            self.acked += 1

    def send(self, topic: str, key: str | None, value: bytes) -> None:
        from kafka.errors import KafkaError, KafkaTimeoutError

        name = self.topics.name(self.topics.short(topic))
        self.sent += 1
        if self._unreachable is not None:
            self._fail(self._unreachable)
            return
        try:
            future = self.producer.send(
                name, key=key.encode() if key is not None else None, value=value
            )
        except KafkaTimeoutError as exc:
            # No metadata within the timeout: the broker is away, do not wait once per record.
            self._unreachable = f"{type(exc).__name__}: {exc}"
            self._fail(exc)
            return
        except KafkaError as exc:  # this record only (too large for the producer)
            self._fail(exc)
            return
        future.add_callback(self._ack)
        future.add_errback(self._fail)

    def close(self) -> None:
        """Wait for every acknowledgement; raise `PublishError` if some did not come."""
        from kafka.errors import KafkaTimeoutError

        try:
            self.producer.flush(timeout=self.timeout_s)
        except KafkaTimeoutError:
            pass  # what is still unacknowledged is counted below
        finally:
            self.producer.close(timeout=5)
        unanswered = self.sent - self.acked - self.failed
        if unanswered > 0:
            self.failed += unanswered
            self.first_failure = self.first_failure or (
                f"no acknowledgement within {self.timeout_s:g} s"
            )
        if self.failed:
            raise PublishError(self.failed, self.sent, self.first_failure or "unknown")

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.producer.close(timeout=5)


def publish_price_book(settings: Settings, path: Path | None) -> list[PriceEntry]:
    from gpuledger.schema.pricebook import load_price_book

    entries = load_price_book(path)
    if not entries:
        raise ValueError(
            f"{path or 'the price book'} holds no price (a header only?): nothing published"
        )
    with Publisher(settings) as pub:
        for entry in entries:
            pub.send("prices", entry.key, entry.model_dump_json().encode())
    return entries


def prices_topic_empty(bootstrap: str, settings: Settings) -> bool:
    """True when nothing was ever published to the prices topic.

    The embedded broker's end offsets are wrong for a topic with data but right (0) for an
    empty one (ARCHITECTURE.md §5), which is all this needs.
    """
    from kafka import KafkaConsumer, TopicPartition

    topic = Topics(settings.topic_prefix).prices
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = consumer.partitions_for_topic(topic) or {0}
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return all(v == 0 for v in ends.values())
    finally:
        consumer.close()


def replay_file(settings: Settings, source: ReplaySource, total: int, *, console: Console) -> int:
    """Publish a checked replay source's good records; how many were sent."""
    from rich.progress import Progress

    sent = 0
    with Publisher(settings) as pub, Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"replaying {source.name}", total=total)
        for record in source.records():
            pub.send(record.topic, record.key, record.payload)
            sent += 1
            if sent % 1000 == 0:
                progress.update(task, completed=sent)
    return sent


# -- the worker and the agent ------------------------------------------------------------
def run_worker(settings: Settings) -> int:
    import faust

    from gpuledger.schema.migrate import migrate, require_current
    from gpuledger.streams.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bootstrap, _ = resolve_bootstrap(settings)
    ensure_topics(bootstrap, Topics(settings.topic_prefix))
    settings = settings.model_copy(update={"bootstrap": bootstrap})
    client = connect_store(settings)
    if settings.store_cluster:
        # A cluster's schema is its migrate job's: DDL from every worker start would queue
        # on every server.
        require_current(client, settings.store_cluster)
    else:
        migrate(client)
    app, _pipeline = create_app(settings.worker_config(), lambda: connect_store(settings))
    faust_worker = faust.Worker(app, loglevel="INFO", quiet=True, redirect_stdouts=False)
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def agent_config(settings: Settings, options: Mapping[str, Any]) -> AgentConfig:
    """`gpuledger agent`'s options completed by the settings: bootstrap, topics, defaults."""
    import socket

    from gpuledger.agents.config import AgentConfig
    from gpuledger.agents.config import options as agent_options

    values = dict(options)
    for option in agent_options():
        setting = option.metadata["setting"]
        if setting is not None and values.get(option.name) is None:
            values[option.name] = getattr(settings, setting)
    if values.get("spool_dir") is None:
        # One spool per agent: a simulated fleet and a real node do not share one.
        simulate, node_name = values.get("simulate"), values.get("node_name")
        name = f"simulate-{simulate.stem}" if simulate else (node_name or socket.gethostname())
        values["spool_dir"] = settings.data_dir / "agent-spool" / name
    bootstrap, _ = resolve_bootstrap(settings)
    return AgentConfig(bootstrap=bootstrap, topic_prefix=settings.topic_prefix, **values)


def run_agent_command(settings: Settings, options: Mapping[str, Any]) -> int:
    """Replace this process with the agent (`python -m gpuledger.agents`), given `options`."""
    from gpuledger.agents.config import to_argv

    argv = to_argv(agent_config(settings, options))
    # The agent runs for months on every node: replace this process with the lean agent
    # entry, so that the CLI's libraries do not stay in its memory (agents/__main__.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "gpuledger.agents", *argv])


def child_env(settings: Settings, bootstrap: str) -> dict[str, str]:
    """The environment of a part `up` starts: every setting in force, flags included."""
    env = dict(os.environ)
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is not None:
            env[f"GPULEDGER_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
    env["GPULEDGER_BOOTSTRAP"] = bootstrap
    env["GPULEDGER_STORE"] = settings.store_url()
    env["PYTHONUNBUFFERED"] = "1"
    return env


def gpuledger_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpuledger.cli", *args]
