"""`gpuledger replay`: a JSON-lines file of `{"topic", "key", "value"}` records, checked whole
before anything is published.

Each line is one JSON object: `topic` with or without the prefix, `key` a string or null, an
object `value` sent as compact JSON and a string `value` as its bytes unchanged (so that
malformed input can be replayed on purpose: the worker dead-letters it). A file is read
twice (checked, then sent); a pipe or standard input is held in memory instead.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gpuledger.schema.topics import Topics

SHOWN_PROBLEMS = 10
"""How many bad lines a refusal names; the rest are counted."""


@dataclass(frozen=True)
class ReplayRecord:
    line: int
    topic: str
    key: str | None
    payload: bytes


@dataclass
class ReplayCheck:
    """What a pass over the file found: the good records' count and each bad line's why."""

    good: int = 0
    problems: list[str] = field(default_factory=list)

    def describe(self, source: str) -> str:
        shown = "; ".join(self.problems[:SHOWN_PROBLEMS])
        more = len(self.problems) - SHOWN_PROBLEMS
        return (
            f"{source}: {len(self.problems)} bad line{'s' if len(self.problems) != 1 else ''} "
            f"({shown}{f'; and {more} more' if more > 0 else ''})"
        )


def parse_line(number: int, raw: bytes, topics: Topics) -> ReplayRecord:
    """One line as a record; ValueError saying what is wrong with it."""
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"line {number}: not JSON ({exc})") from None
    if not isinstance(record, dict):
        kind = "a JSON array" if isinstance(record, list) else f"a JSON {type(record).__name__}"
        raise ValueError(
            f'line {number}: {kind}; each line must be one object {{"topic", "key", "value"}}'
        )
    missing = [name for name in ("topic", "value") if name not in record]
    if missing:
        raise ValueError(f"line {number}: no {' and no '.join(repr(m) for m in missing)}")
    topic, key, value = record["topic"], record.get("key"), record["value"]
    if not isinstance(topic, str):
        raise ValueError(f"line {number}: topic must be a string, got {topic!r:.60}")
    try:
        short = topics.short(topic)
    except KeyError as exc:
        raise ValueError(f"line {number}: {exc.args[0]}") from None
    if key is not None and not isinstance(key, str | int):
        raise ValueError(f"line {number}: key must be a string or null, got {key!r:.60}")
    if isinstance(value, str):
        payload = value.encode()
    elif isinstance(value, dict | list):
        payload = json.dumps(value, separators=(",", ":")).encode()
    else:
        raise ValueError(
            f"line {number}: value must be an object (sent as JSON) or a string (sent as is)"
        )
    return ReplayRecord(number, short, None if key is None else str(key), payload)


def _lines(source: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(source, start=1):
        if raw.strip():
            yield number, raw


class ReplaySource:
    """The records of a file, or of a pipe or standard input (`-`), readable twice."""

    def __init__(self, path: Path, topics: Topics) -> None:
        self.path = path
        self.topics = topics
        self.name = "standard input" if str(path) == "-" else str(path)
        self._held: list[bytes] | None = None
        if str(path) == "-":
            self._held = sys.stdin.buffer.readlines()
        elif not stat.S_ISREG(os.stat(path).st_mode):
            with path.open("rb") as handle:  # a pipe: it can be read once only
                self._held = handle.readlines()

    def _raw(self) -> Iterator[tuple[int, bytes]]:
        if self._held is not None:
            yield from _lines(self._held)
            return
        with self.path.open("rb") as handle:
            yield from _lines(handle)

    def check(self) -> ReplayCheck:
        found = ReplayCheck()
        for number, raw in self._raw():
            try:
                parse_line(number, raw, self.topics)
            except ValueError as exc:
                found.problems.append(str(exc))
            else:
                found.good += 1
        return found

    def records(self) -> Iterator[ReplayRecord]:
        """The good records, in file order (bad lines skipped)."""
        for number, raw in self._raw():
            try:
                yield parse_line(number, raw, self.topics)
            except ValueError:
                continue
