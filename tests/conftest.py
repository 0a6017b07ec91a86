"""Fixtures shared by every test folder: the real engines, started for a test and stopped after."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from gpuledger.store import connect, ensure_store, stop_owned_stores


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
