"""How every benchmark prints: a table of figures, each with its goal and, where there is one,
the baseline measured in the same run and the ratio to it."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

console = Console(width=140)


@dataclass(frozen=True)
class Figure:
    name: str
    value: str
    goal: str = ""
    met: bool | None = None  # None: no goal to meet, or not comparable
    baseline: str = ""
    ratio: str = ""
    note: str = ""


def show(title: str, figures: list[Figure], notes: list[str] | None = None) -> None:
    table = Table(title=title, title_justify="left", show_lines=False, expand=False)
    for column in ("figure", "measured", "goal", "met", "baseline (same run)", "ratio", "note"):
        table.add_column(column, overflow="fold")
    for f in figures:
        met = "" if f.met is None else ("yes" if f.met else "NO")
        table.add_row(f.name, f.value, f.goal, met, f.baseline, f.ratio, f.note)
    console.print(table)
    for note in notes or []:
        console.print(f"  {note}", highlight=False)
