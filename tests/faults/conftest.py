"""The fault tests' fixtures; tests/conftest.py prints their table at the end of the run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.rig import FAULT_TABLE, Rig


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """`make_rig(name, partitions=1)`: a broker and a store of the test's own, closed after."""
    rigs: list[Rig] = []

    def make(name: str = "rig", *, partitions: int = 1) -> Rig:
        rig = Rig(tmp_path / name, partitions=partitions)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture(autouse=True)
def _report_fault_rows(request: pytest.FixtureRequest) -> Iterator[None]:
    """Send the test's fault rows with its report, so that a run split over processes still
    prints the whole table."""
    before = len(FAULT_TABLE)
    yield
    for row in FAULT_TABLE[before:]:
        request.node.user_properties.append(("fault_row", dataclasses.astuple(row)))
