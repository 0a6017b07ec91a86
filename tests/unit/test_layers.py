"""The layers of docs/ARCHITECTURE.md §6 hold: imports only point down.

Read from the source with `ast` (nothing is imported), so a forbidden import fails here even
where it sits inside a function.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT

# The folders that are installed as subpackages of gpuledger (links in gpuledger/).
SUBPACKAGES = ("agents", "streams", "schema", "grafana", "ledger", "guard")
# Libraries that do I/O: the pure ledger never imports them.
IO_LIBRARIES = (
    "aiohttp",
    "aiokafka",
    "asyncio",
    "chdb",
    "clickhouse_connect",
    "faust",
    "http",
    "kafka",
    "kubernetes",
    "mode",
    "pynvml",
    "requests",
    "socket",
    "subprocess",
    "urllib",
)
# What each layer may import of gpuledger (besides itself).
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "gpuledger.schema": (),
    "gpuledger.ledger": ("gpuledger.schema",),
    "gpuledger.agents": ("gpuledger.schema",),
    "gpuledger.streams": ("gpuledger.schema", "gpuledger.ledger"),
    "gpuledger.guard": ("gpuledger.schema", "gpuledger.ledger"),
    "gpuledger.analysts": ("gpuledger.schema", "gpuledger.ledger", "gpuledger.output"),
    "gpuledger.grafana": ("gpuledger.schema", "gpuledger.store"),
    "gpuledger.schedulers": ("gpuledger.schema",),
    "gpuledger.store": (),
}


def module_name(path: Path) -> str:
    """`streams/sink.py` -> `gpuledger.streams.sink`; `gpuledger/cli.py` -> `gpuledger.cli`."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] in SUBPACKAGES:
        parts.insert(0, "gpuledger")
    return ".".join(parts)


def through_a_link(path: Path) -> bool:
    """gpuledger/agents/... is agents/... seen through its link: count it once."""
    parts = path.relative_to(ROOT).parts
    return parts[0] == "gpuledger" and parts[1] in SUBPACKAGES


def python_files(tree: str) -> list[Path]:
    return [p for p in sorted((ROOT / tree).rglob("*.py")) if not through_a_link(p)]


def production_files() -> Iterator[Path]:
    for top in ("gpuledger", *SUBPACKAGES):
        yield from python_files(top)


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for each import; relative imports are resolved against the module."""
    here = module_name(path).split(".")
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
            else:
                yield node.lineno, node.module or ""


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> str | None:
    for layer in MAY_IMPORT:
        if within(module, layer):
            return layer
    return None


def test_the_production_code_is_found() -> None:
    names = {module_name(p) for p in production_files()}
    assert {"gpuledger.cli", "gpuledger.streams.sink", "gpuledger.ledger.cost"} <= names


@pytest.mark.parametrize("tree", ["gpuledger", *SUBPACKAGES, "tests", "bench"])
def test_nothing_imports_a_folder_by_its_bare_name(tree: str) -> None:
    """Installed, `agents` or `schema` would be someone else's package: always gpuledger.X."""
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in python_files(tree)
        for line, name in imports_of(path)
        if name.split(".")[0] in SUBPACKAGES
    ]
    assert not bad, "\n".join(bad)


def test_no_string_names_a_folder_as_a_module_by_its_bare_name() -> None:
    """`files("schema")`, `python -m agents`: names that only resolve in a checkout."""
    bare = "|".join(SUBPACKAGES)
    named = re.compile(rf"""(files|import_module)\(["']({bare})\b|["']-m["'],\s*["']({bare})\b""")
    bad = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for tree in ("gpuledger", *SUBPACKAGES, "bench")
        for path in python_files(tree)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if named.search(line)
    ]
    assert not bad, "\n".join(bad)


def test_each_layer_imports_only_what_is_below_it() -> None:
    bad = []
    for path in production_files():
        module = module_name(path)
        layer = layer_of(module)
        if layer is None:
            continue
        allowed = (layer, *MAY_IMPORT[layer])
        for line, name in imports_of(path):
            if within(name, "gpuledger") and not any(within(name, a) for a in allowed):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {layer} may not import {name}")
    assert not bad, "\n".join(bad)


def test_the_ledger_does_no_io() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in python_files("ledger")
        for line, name in imports_of(path)
        if name.split(".")[0] in IO_LIBRARIES
    ]
    assert not bad, "\n".join(bad)


def test_command_groups_do_not_import_the_entry_point() -> None:
    """`gpuledger.cli` assembles the command groups; a group importing it back is a cycle."""
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in production_files()
        if module_name(path) != "gpuledger.cli" and within(module_name(path), "gpuledger")
        for line, name in imports_of(path)
        if name == "gpuledger.cli" or name.startswith("gpuledger.cli.")
        if not within(module_name(path), "gpuledger.cli")
    ]
    assert not bad, "\n".join(bad)


def _module_level_imports(path: Path) -> Iterator[str]:
    """Modules imported when `path` is imported (not inside a function or TYPE_CHECKING)."""
    pending: list[ast.AST] = list(ast.parse(path.read_text(), str(path)).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.module or ""
        pending.extend(ast.iter_child_nodes(node))


def test_the_node_agent_does_not_import_the_simulator() -> None:
    """The simulator is for `--simulate`: the runner loads it lazily, nothing else at all."""
    bad = []
    for path in python_files("agents"):
        module = module_name(path)
        if within(module, "gpuledger.agents.sim"):
            continue
        if module == "gpuledger.agents.runner":
            names = list(_module_level_imports(path))
        else:
            names = [name for _, name in imports_of(path)]
        bad += [
            f"{path.relative_to(ROOT)} imports {name}"
            for name in names
            if within(name, "gpuledger.agents.sim")
        ]
    assert not bad, "\n".join(bad)
