"""Topic names (ARCHITECTURE.md §2) under a configurable prefix, with their cleanup policies."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "gpuledger."

# name -> cleanup policy; retention for the delete topics is the broker's default unless set.
CLEANUP: dict[str, str] = {
    "samples": "delete",
    "jobs": "compact",
    "prices": "compact",
    "nodes": "compact",
    "usage": "delete",
    "facts": "delete",
    "alerts": "delete",
    "deadletter": "delete",
    "actions": "delete",  # the guard's decisions, as its audit trail records them
}

# Samples are short-lived: a day is plenty to replay an outage.
RETENTION_MS: dict[str, int] = {"samples": 24 * 3600 * 1000}


class _Topic:
    """A topic's full name read as an attribute: `topics.samples` is `topics.name("samples")`."""

    def __init__(self, short: str) -> None:
        self.short = short

    def __get__(self, topics: Topics, owner: type | None = None) -> str:
        return topics.name(self.short)


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def name(self, short: str) -> str:
        if short not in CLEANUP:
            raise KeyError(f"unknown topic {short!r}; known: {', '.join(CLEANUP)}")
        return f"{self.prefix}{short}"

    def short(self, name: str) -> str:
        """The short name of `name`, given with or without the prefix."""
        bare = name.removeprefix(self.prefix)
        if bare not in CLEANUP:
            raise KeyError(
                f"unknown topic {name!r}; known: {', '.join(self.prefix + s for s in CLEANUP)}"
            )
        return bare

    samples = _Topic("samples")
    jobs = _Topic("jobs")
    prices = _Topic("prices")
    nodes = _Topic("nodes")
    usage = _Topic("usage")
    facts = _Topic("facts")
    alerts = _Topic("alerts")
    deadletter = _Topic("deadletter")
    actions = _Topic("actions")

    def all(self) -> list[str]:
        return [self.name(s) for s in CLEANUP]

    def configs(self, short: str) -> dict[str, str]:
        config = {"cleanup.policy": CLEANUP[short]}
        if short in RETENTION_MS:
            config["retention.ms"] = str(RETENTION_MS[short])
        return config
