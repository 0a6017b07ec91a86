"""The fault tests' fixtures, and the fault table printed at the end of the run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.rig import FAULT_TABLE, Rig, format_table


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FAULT_TABLE:
        terminalreporter.section("fault table")
        terminalreporter.write_line(format_table(FAULT_TABLE))
