"""Helpers the integration tests share: a running worker process, publishing, polling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from kafka import KafkaConsumer, KafkaProducer
from pydantic import BaseModel

from gpuledger.children import die_with_parent
from gpuledger.schema.messages import GpuSample
from gpuledger.schema.topics import Topics

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def wait_until(
    probe: Callable[[], T | None], *, timeout_s: float = 60.0, every_s: float = 0.3, what: str = ""
) -> T:
    """Poll `probe` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or probe}: {last!r}")


class Sender:
    """Publishes messages as a scheduler, an agent or a price feed would."""

    def __init__(self, bootstrap: str, topics: Topics | None = None) -> None:
        self.topics = topics or Topics()
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)

    def send(self, short: str, key: str, value: BaseModel | dict[str, Any] | bytes) -> None:
        if isinstance(value, BaseModel):
            payload = value.model_dump_json().encode()
        elif isinstance(value, dict):
            payload = json.dumps(value).encode()
        else:
            payload = value
        self.producer.send(self.topics.name(short), key=key.encode(), value=payload)

    def flush(self) -> None:
        self.producer.flush(timeout=30)

    def close(self) -> None:
        self.producer.close(timeout=10)


def read_topic(bootstrap: str, topic: str, timeout_s: float = 5.0) -> list[Any]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=int(timeout_s * 1000),
    )
    try:
        return list(consumer)
    finally:
        consumer.close()


class WorkerProcess:
    """`gpuledger worker` as a real child process, as deployed."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        # A restart appends to the same log: only this life's "worker ready" counts.
        before = len(self.log())
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpuledger.cli", "worker"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=die_with_parent,
        )
        log.close()
        wait_until(
            lambda: "worker ready" in self.log()[before:] or self.proc.poll() is not None,  # type: ignore[union-attr]
            timeout_s=60,
            what="the worker to be ready",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited at start:\n{self.log()[-3000:]}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def env_for(bootstrap: str, store_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GPULEDGER_BOOTSTRAP=bootstrap,
        GPULEDGER_STORE=store_url,
        GPULEDGER_DATA_DIR=str(data_dir),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def rows(client: Any, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    return list(client.query(sql, parameters=params or None).result_rows)


def scalar(client: Any, sql: str, **params: Any) -> Any:
    found = rows(client, sql, **params)
    return found[0][0] if found else None


H100 = "NVIDIA H100 80GB HBM3"
GiB = 2**30


def gpu_sample(
    gpu_uuid: str = "GPU-1",
    ts: float = 1_767_225_600.0,
    *,
    node: str = "n1",
    gpu_name: str = H100,
    checked: bool = True,
    **fields: Any,
) -> GpuSample:
    """A sample as the message model builds it, any other field by keyword. `checked=False`
    skips the model's bounds, for the out-of-range input that tests send on purpose."""
    build = GpuSample if checked else GpuSample.model_construct
    return build(gpu_uuid=gpu_uuid, ts=ts, node=node, gpu_name=gpu_name, **fields)


def sample_record(sample: GpuSample) -> dict[str, Any]:
    """A sample as it travels in a batch's JSON."""
    return sample.model_dump(mode="json")


def batch(node: str, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {"v": 1, "node": node, "samples": list(samples)}


def run_gpuledger(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    cwd: Path = ROOT,
    timeout_s: float = 180,
) -> subprocess.CompletedProcess[str]:
    """`gpuledger ARGS` as a user runs it: a new process, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "gpuledger.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env if env is not None else dict(os.environ),
        cwd=cwd,
        timeout=timeout_s,
    )
