"""Benchmarks (`make bench` = `python -m bench`): each prints a table of figures, each figure
with its goal beside it and, where there is one, a ratio against a baseline measured in the
same run (this machine is small and shared: absolute numbers drift, ratios much less).

A benchmark is a module of this package (its name is the benchmark's name) that defines

    SUMMARY: str                    # one line, shown by `python -m bench --list`
    def run(quick: bool) -> None    # measure and print; `quick` = a short smoke run

`python -m bench` runs them all in name order, `python -m bench NAME...` only those,
`python -m bench --list` lists them. Modules whose name starts with `_` are helpers.
Benchmarks are not tests: `make test` never runs them.
"""
