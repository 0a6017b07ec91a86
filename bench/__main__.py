"""`python -m bench [--list] [--quick] [NAME...]`: list or run the benchmarks of this package."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback
from types import ModuleType

import bench


def discover() -> dict[str, ModuleType]:
    """name -> module, for every module of the package that is a benchmark."""
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if isinstance(getattr(module, "SUMMARY", None), str) and callable(
            getattr(module, "run", None)
        ):
            found[info.name] = module
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    args = parser.parse_args(argv)
    found = discover()
    if args.list:
        width = max((len(n) for n in found), default=0)
        for name, module in found.items():
            print(f"{name.ljust(width)}  {module.SUMMARY}")
        return 0
    wanted = [n.replace("-", "_") for n in args.names] or list(found)
    unknown = [n for n in wanted if n not in found]
    if unknown:
        print(
            f"unknown benchmark {unknown[0]!r}; known: {', '.join(found)} (python -m bench --list)",
            file=sys.stderr,
        )
        return 2
    failed: list[str] = []
    for name in wanted:
        started = time.monotonic()
        print(f"\n=== {name}: {found[name].SUMMARY}", flush=True)
        try:
            found[name].run(quick=args.quick)
        except Exception:  # one benchmark's failure must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            print(f"=== {name} FAILED after {time.monotonic() - started:,.0f} s", flush=True)
            continue
        print(f"=== {name} done in {time.monotonic() - started:,.0f} s", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
