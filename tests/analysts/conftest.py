"""One seeded store for the analysts' tests: the fleet of `seed.py`, migrated and written once.

The tests here only read it (or write tables of their own, such as `recommendations`), so a
single store serves them all and keeps the suite fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from gpuledger.schema.cluster import CLIENT_SETTINGS
from gpuledger.schema.migrate import migrate
from gpuledger.store import connect, ensure_store, stop_owned_stores
from tests.analysts.seed import seed
from tests.fixtures.cluster import CLUSTER, OneShardCluster, make_cluster_folder


@pytest.fixture(scope="session")
def seeded_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`chdb:///…` of a store holding the seeded fleet."""
    path: Path = tmp_path_factory.mktemp("analysts") / "store"
    ensure_store(path)
    url = f"chdb://{path.resolve()}"
    client = connect(url, start=False)
    migrate(client)
    seed(client)
    client.close()
    yield url
    stop_owned_stores(path)


@pytest.fixture(scope="session")
def seeded_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same fleet in the cluster layout (`db migrate --cluster`) on a one-shard cluster,
    written through the Distributed tables as a worker on a cluster writes."""
    path = make_cluster_folder(tmp_path_factory.mktemp("analysts-cluster") / "store")
    ensure_store(path)
    url = f"chdb://{path.resolve()}"
    client = connect(url, start=False, settings=dict(CLIENT_SETTINGS))
    migrate(OneShardCluster(client), cluster=CLUSTER)
    seed(client)
    client.close()
    yield url
    stop_owned_stores(path)


@pytest.fixture
def seeded(seeded_url: str) -> Iterator[Client]:
    """A clickhouse-connect client of the seeded store."""
    client = connect(seeded_url, start=False)
    yield client
    client.close()
