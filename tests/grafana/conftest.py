"""One seeded store for the Grafana tests: the real engine behind ClickHouse's HTTP interface."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from gpuledger.store import connect, ensure_store, stop_owned_stores
from tests.grafana.seed import seed


@pytest.fixture(scope="package")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """A store with the fleet of tests/grafana/seed.py, shared by the package's tests."""
    path: Path = tmp_path_factory.mktemp("grafana-store") / "store"
    ensure_store(path)
    client = connect(f"chdb://{path.resolve()}", start=False)
    seed(client)
    yield client
    client.close()
    stop_owned_stores(path)
