"""`python -m gpuledger.agents`: the agent process, without the CLI framework.

`gpuledger agent` resolves its settings (environment, flags, defaults) and then replaces itself
with this entry (exec, same PID), so that the process that runs for months on every GPU node
does not keep typer, rich and the settings machinery in memory (about 8 MB of its 50 MB
budget). Every value arrives explicitly; `gpuledger agent --help` documents them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import sys
from pathlib import Path

M_ARENA_MAX = -8  # mallopt: glibc's per-thread malloc arenas inflate RSS of threaded processes


def _limit_malloc_arenas() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuledger.agents", description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic-prefix", required=True)
    parser.add_argument("--interval", type=float, required=True)
    parser.add_argument("--spool-dir", type=Path, required=True)
    parser.add_argument("--spool-max-bytes", type=int, required=True)
    parser.add_argument("--proc-root", type=Path, required=True)
    parser.add_argument("--simulate", type=Path)
    parser.add_argument("--node", action="append", default=[])
    parser.add_argument("--node-name")
    parser.add_argument("--duration", type=float)
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--metrics-port", type=int)
    parser.add_argument("--metrics-addr", default="0.0.0.0")
    parser.add_argument("--kubelet-url")
    parser.add_argument("--kubelet-insecure-tls", action="store_true")
    args = parser.parse_args(argv)
    _limit_malloc_arenas()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from gpuledger.agents.runner import AgentError, run_agent

    # What was imported lives as long as the agent: keep the collector off it.
    gc.collect()
    gc.freeze()
    try:
        return run_agent(
            args.bootstrap,
            topic_prefix=args.topic_prefix,
            simulate=args.simulate,
            nodes=args.node,
            node_name=args.node_name,
            interval_s=args.interval,
            duration_s=args.duration,
            speed=args.speed,
            proc_root=args.proc_root,
            spool_dir=args.spool_dir,
            spool_max_bytes=args.spool_max_bytes,
            metrics_port=args.metrics_port,
            metrics_addr=args.metrics_addr,
            kubelet_url=args.kubelet_url,
            kubelet_insecure_tls=args.kubelet_insecure_tls,
        )
    except AgentError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
