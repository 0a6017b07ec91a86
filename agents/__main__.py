"""`python -m gpuledger.agents`: the agent process, without the CLI framework.

`gpuledger agent` resolves its settings (environment, flags, defaults) and then replaces itself
with this entry (exec, same PID), so that the process that runs for months on every GPU node
does not keep typer, rich and the settings machinery in memory (about 8 MB of its 50 MB
budget). Every value arrives explicitly, as the options of `AgentConfig`
(agents/config.py); `gpuledger agent --help` documents them.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import sys

from gpuledger.agents.config import parse_argv

M_ARENA_MAX = -8  # mallopt: glibc's per-thread malloc arenas inflate RSS of threaded processes


def _limit_malloc_arenas() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)


def main(argv: list[str] | None = None) -> int:
    config = parse_argv(argv, prog="python -m gpuledger.agents", description=__doc__)
    _limit_malloc_arenas()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from gpuledger.agents.runner import AgentError, run_agent

    # What was imported lives as long as the agent: keep the collector off it.
    gc.collect()
    gc.freeze()
    try:
        return run_agent(config)
    except AgentError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
