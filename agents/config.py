"""The agent's options, spelled once: `AgentConfig`'s fields, with their defaults and help.

Two front ends read them: `gpuledger agent` (typer, with the settings and environment
variables) and `python -m gpuledger.agents` (argparse, the lean process the CLI execs into).
`to_argv` and `parse_argv` carry a config from the first to the second unchanged. A field
with a `flag` is a command-line option; the others are for code that runs the agent itself.
This module imports nothing heavy: the CLI reads it to build its command.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuledger.schema.topics import DEFAULT_PREFIX

if TYPE_CHECKING:
    from gpuledger.schema.messages import NodeInfo


def option(
    help: str,
    *,
    flag: str | None = None,
    env: str | None = None,
    setting: str | None = None,
    kind: type = str,
    repeat: bool = False,
    global_option: bool = False,
) -> dict[str, Any]:
    """A command-line option's metadata: `flag` (default: the field's name), read as `kind`.

    `env` names the environment variable `gpuledger agent` also reads it from; `setting` the
    gpuledger setting (`GPULEDGER_<SETTING>`, `--set`) that gives its default in the CLI. A
    `global_option` is not an option of `gpuledger agent`: gpuledger's own options give it.
    """
    meta: dict[str, Any] = {"help": help, "flag": flag, "env": env, "setting": setting}
    meta.update(kind=kind, repeat=repeat, global_option=global_option)
    return meta


@dataclass(frozen=True)
class AgentConfig:
    """What one agent process runs with (`run_agent`)."""

    bootstrap: str = field(
        metadata=option("Kafka bootstrap servers (host:port,...).", global_option=True)
    )
    topic_prefix: str = field(
        default=DEFAULT_PREFIX,
        metadata=option("Prefix of every topic name.", global_option=True),
    )
    simulate: Path | None = field(
        default=None,
        metadata=option(
            "Fleet scenario file: simulate its GPUs instead of reading NVML "
            "(e.g. agents/scenarios/demo.toml).",
            kind=Path,
        ),
    )
    nodes: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "With --simulate: only these nodes (repeatable).", flag="--node", repeat=True
        ),
    )
    interval_s: float = field(
        default=1.0,
        metadata=option(
            "Sampling interval in seconds.", flag="--interval", setting="interval_s", kind=float
        ),
    )
    duration_s: float | None = field(
        default=None,
        metadata=option("Stop after this many seconds.", flag="--duration", kind=float),
    )
    speed: float = field(
        default=1.0,
        metadata=option("With --simulate: scenario seconds per wall second.", kind=float),
    )
    node_name: str | None = field(
        default=None,
        metadata=option(
            "This node's name in samples and metrics (default: the hostname; in a DaemonSet, "
            "the Kubernetes node name).",
            env="GPULEDGER_NODE_NAME",
        ),
    )
    proc_root: Path = field(
        default=Path("/proc"),
        metadata=option(
            "The host's /proc, where GPU processes are attributed (a DaemonSet mounts the "
            "host's /proc, e.g. at /host/proc).",
            env="GPULEDGER_PROC_ROOT",
            kind=Path,
        ),
    )
    spool_dir: Path | None = field(
        default=None,
        metadata=option(
            "Where samples wait while Kafka is unreachable; kept across restarts "
            "(default: DATA_DIR/agent-spool/NODE).",
            env="GPULEDGER_SPOOL_DIR",
            kind=Path,
        ),
    )
    spool_max_mb: float = field(
        default=256.0,
        metadata=option(
            "Spool size limit in MB: beyond it the oldest samples are dropped and counted.",
            env="GPULEDGER_SPOOL_MAX_MB",
            kind=float,
        ),
    )
    metrics_port: int | None = field(
        default=None,
        metadata=option(
            "Serve Prometheus /metrics (dcgm-exporter names) on this port, e.g. 9400.",
            env="GPULEDGER_METRICS_PORT",
            kind=int,
        ),
    )
    metrics_addr: str = field(
        default="0.0.0.0",
        metadata=option("Address /metrics listens on.", env="GPULEDGER_METRICS_ADDR"),
    )
    kubelet_url: str | None = field(
        default=None,
        metadata=option(
            "The kubelet's pod list, e.g. https://$NODE_IP:10250/pods: names pods in metrics "
            "and takes job labels (gpuledger.io/job-id, ...) from pod labels.",
            env="GPULEDGER_KUBELET_URL",
        ),
    )
    kubelet_insecure_tls: bool = field(
        default=False,
        metadata=option(
            "Do not verify the kubelet's (often self-signed) serving certificate.",
            env="GPULEDGER_KUBELET_INSECURE_TLS",
            kind=bool,
        ),
    )
    # For code that runs the agent itself (tests, benchmarks): no flags.
    start: float | None = None  # scenario time of the first tick (default: now)
    node_info: NodeInfo | None = None  # published once at start on a real node
    log_every_s: float = 10.0
    drain_timeout_s: float = 10.0  # how long the agent keeps sending on the way out

    @property
    def spool_max_bytes(self) -> int:
        return int(self.spool_max_mb * 1024 * 1024)


def options() -> list[dataclasses.Field[Any]]:
    """The fields that are command-line options, in the order `--help` lists them."""
    return [f for f in dataclasses.fields(AgentConfig) if f.metadata.get("help")]


def flag_of(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata["flag"] or "--" + f.name.replace("_", "-"))


def to_argv(config: AgentConfig) -> list[str]:
    """`config`'s options as `python -m gpuledger.agents` arguments (defaults left out)."""
    argv: list[str] = []
    for f in options():
        value = getattr(config, f.name)
        if value == f.default or (f.metadata["repeat"] and not value):
            continue
        if f.metadata["kind"] is bool:
            argv.append(flag_of(f))
        elif f.metadata["repeat"]:
            for item in value:
                argv += [flag_of(f), str(item)]
        else:
            argv += [flag_of(f), repr(value) if isinstance(value, float) else str(value)]
    return argv


def argument_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """The options as an argparse parser (`parse_argv` reads its result)."""
    parser = argparse.ArgumentParser(**kwargs)
    for f in options():
        meta = f.metadata
        if meta["kind"] is bool:
            parser.add_argument(flag_of(f), dest=f.name, action="store_true", help=meta["help"])
        elif meta["repeat"]:
            parser.add_argument(flag_of(f), dest=f.name, action="append", help=meta["help"])
        else:
            parser.add_argument(
                flag_of(f),
                dest=f.name,
                type=meta["kind"],
                default=f.default,
                required=f.default is dataclasses.MISSING,
                help=meta["help"],
            )
    return parser


def parse_argv(argv: Sequence[str] | None = None, **parser_kwargs: Any) -> AgentConfig:
    args = argument_parser(**parser_kwargs).parse_args(argv)
    values = vars(args)
    values["nodes"] = tuple(values["nodes"] or ())
    return AgentConfig(**values)
