"""`python -m gpuledger.agents.sim.libnvml build|feed`: the simulated libnvidia-ml, and a live node.

    python -m gpuledger.agents.sim.libnvml build [--out DIR]
    python -m gpuledger.agents.sim.libnvml feed --scenario FILE --node NAME --dir DIR

`feed` builds the library, serves the node's hardware from the scenario (following the wall
clock) until Ctrl-C, and prints what the agent needs to read it as it would a GPU node.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from gpuledger.agents.sim.engine import Scenario
from gpuledger.agents.sim.libnvml.build import BuildError, build_library
from gpuledger.agents.sim.libnvml.feed import STATE_ENV, NvmlFeed
from gpuledger.agents.sim.spec import ScenarioError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpuledger.agents.sim.libnvml", description=__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile the library; print its folder")
    build.add_argument("--out", type=Path, help="folder for libnvidia-ml.so.1 (default: a cache)")
    feed = sub.add_parser("feed", help="serve a scenario node to the library until Ctrl-C")
    feed.add_argument("--scenario", type=Path, required=True)
    feed.add_argument("--node", required=True, help="the scenario node to serve")
    feed.add_argument("--dir", type=Path, required=True, help="for the state file and /proc tree")
    feed.add_argument("--origin", type=float, help="scenario origin (default: now)")
    args = parser.parse_args(argv)
    try:
        library = build_library(args.out if args.command == "build" else None)
    except BuildError as exc:
        print(f"simnvml: {exc}", file=sys.stderr)
        return 2
    if args.command == "build":
        print(library)
        return 0
    try:
        scenario = Scenario.load(args.scenario, origin=args.origin or time.time())
        node = NvmlFeed(args.dir / "nvml.state", scenario, args.node, proc_root=args.dir / "proc")
    except (ScenarioError, KeyError, ValueError) as exc:
        print(f"simnvml: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def handle(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    print(
        f"serving node {args.node} of {args.scenario}; in another shell:\n"
        f"  export LD_LIBRARY_PATH={library}\n"
        f"  export {STATE_ENV}={node.path}\n"
        f"  gpuledger agent --node-name {args.node} --proc-root {args.dir / 'proc'} "
        "--metrics-port 9400",
        flush=True,
    )
    node.run(stop)
    node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
