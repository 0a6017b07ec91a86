"""Compile the simulated `libnvidia-ml.so.1` with gcc against NVIDIA's `nvml.h`.

`nvml.h` comes from the PyPI wheel `nvidia-nvml-dev` (a dev dependency). Compiling against
NVIDIA's own header, with warnings as errors, is what keeps the library's function signatures
and structures those of the real ABI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from gpuledger.agents.sim.libnvml.layout import c_header

SOURCE = Path(__file__).with_name("libnvidia_ml.c")
LIBRARY = "libnvidia-ml.so.1"
NVML_DEV_PIN = "nvidia-nvml-dev==13.5.37"


class BuildError(RuntimeError):
    """The library cannot be built; the message says what is missing and how to get it."""


def nvml_include_dir() -> Path:
    """The folder of `nvml.h` in the installed `nvidia-nvml-dev` wheel."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        found = sorted(Path(root).glob("*/include/nvml.h")) + sorted(
            Path(root).glob("include/nvml.h")
        )
        if found:
            return found[-1].parent
    raise BuildError(
        "nvml.h not found: the simulated NVML is compiled against NVIDIA's header from the "
        f"PyPI wheel nvidia-nvml-dev; install it with `pip install {NVML_DEV_PIN}`"
    )


def default_build_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "gpuledger" / "simnvml"


def build_library(out_dir: Path | None = None, *, old_driver: bool = False) -> Path:
    """Build (or reuse) the library; returns the folder to put on `LD_LIBRARY_PATH`.

    `old_driver` leaves out the `_v3` process calls, as drivers before R510 do.
    """
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        raise BuildError(
            "gcc not found: the simulated NVML is a C library; install gcc "
            "(Debian/Ubuntu: apt-get install gcc) or set CC"
        )
    include = nvml_include_dir()
    header = c_header()
    defines = ["-DSIMNVML_OLD_DRIVER"] if old_driver else []
    digest = hashlib.sha256(
        SOURCE.read_bytes()
        + header.encode()
        + (include / "nvml.h").read_bytes()
        + " ".join(defines).encode()
    ).hexdigest()[:16]
    if out_dir is None:
        out_dir = default_build_root() / f"{digest}{'-old' if old_driver else ''}"
    library = out_dir / LIBRARY
    stamp = out_dir / "source.sha256"
    if library.exists() and stamp.exists() and stamp.read_text() == digest:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "simnvml_state.h").write_text(header)
    command = [
        compiler,
        "-shared",
        "-fPIC",
        "-O2",
        "-std=c11",
        "-D_GNU_SOURCE",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-deprecated-declarations",  # nvml.h marks calls pynvml still makes as deprecated
        *defines,
        f"-I{out_dir}",
        f"-I{include}",
        "-o",
        str(library),
        str(SOURCE),
        "-pthread",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(
            f"gcc could not build the simulated {LIBRARY} (exit {result.returncode}):\n"
            f"{' '.join(command)}\n{result.stderr.strip()}"
        )
    stamp.write_text(digest)
    return out_dir
