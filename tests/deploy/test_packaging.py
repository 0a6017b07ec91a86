"""The wheel a user installs holds one top-level package, `gpuledger`, and every file of ours.

Installed beside other packages, a top-level `agents` or `schema` would overwrite (or be
overwritten by) someone else's: the folders at the repository's top go in as gpuledger.agents,
gpuledger.schema, …
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.e2e

FOLDERS = ("agents", "streams", "schema", "grafana", "ledger", "guard")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=600,
    )
    (found,) = out.glob("gpuledger-*.whl")
    return found


@pytest.fixture(scope="module")
def wheel(built: Path) -> list[str]:
    with zipfile.ZipFile(built) as archive:
        return archive.namelist()


def tracked(folder: str) -> set[str]:
    """The files git keeps under a folder, as paths relative to the repository."""
    listed = subprocess.run(
        ["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return {line for line in listed.stdout.splitlines() if (ROOT / line).is_file()}


def test_a_wheel_has_exactly_one_top_level_package(wheel: list[str]) -> None:
    tops = {name.split("/")[0] for name in wheel if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"gpuledger"}


def test_each_folder_is_packed_once_under_gpuledger(wheel: list[str]) -> None:
    packed = set(wheel)
    assert len(packed) == len(wheel), "a file is packed twice"
    for folder in FOLDERS:
        want = {f"gpuledger/{path}" for path in tracked(folder)}
        assert want, folder
        assert want <= packed, sorted(want - packed)[:5]


def test_the_packages_own_files_are_packed(wheel: list[str]) -> None:
    own = {path for path in tracked("gpuledger") if Path(path).parts[1] not in FOLDERS}
    assert own <= set(wheel), sorted(own - set(wheel))[:5]


def test_the_installed_package_finds_its_own_data(built: Path, tmp_path: Path) -> None:
    """Unpacked alone (no checkout on the path), the wheel reads its migrations as package
    data under gpuledger.schema; a bare `schema` is nowhere to be found."""
    with zipfile.ZipFile(built) as archive:
        archive.extractall(tmp_path)
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
        "from gpuledger.schema.migrate import available; "
        "names = [m.filename for m in available()]; "
        "assert names[0] == '000_schema_migrations.sql', names; "
        "import importlib.util; assert importlib.util.find_spec('schema') is None; "
        "print(len(names))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(list((ROOT / "schema" / "clickhouse").glob("[0-9]*.sql")))
