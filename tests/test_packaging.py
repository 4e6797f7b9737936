"""The wheel ships every file the C++ kernels' build reads.

The kernels are compiled on first use from sources installed with the package; a source or header missing from the
wheel makes every non-editable install (`pip install .`, a wheel, `pip install git+...`) run without them, silently.
What the build reads is derived from the code, not listed here: the `.cc` files in the package (and the loader's own
`_SOURCES` / `_HEADERS` where it declares them), and every `#include "..."` they reach that is not JAX's FFI header.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax

import seqjax

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(seqjax.__file__).resolve().parent
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _loader_dirs() -> list[Path]:
    """Folders of the package that hold C++ sources (the loader sits beside them)."""
    return sorted({p.parent for p in PACKAGE.rglob("*.cc")})


def _declared(folder: Path) -> set[Path]:
    """The files the loader in `folder` says it reads (`_SOURCES`, `_HEADERS`), where it names them."""
    module = importlib.import_module(".".join(folder.relative_to(PACKAGE.parent).parts))
    names = (*getattr(module, "_SOURCES", ()), *getattr(module, "_HEADERS", ()))
    return {folder / name for name in names}


def _build_inputs() -> set[Path]:
    """Every source the build compiles and every local header those reach through `#include "..."`."""
    todo = [p for folder in _loader_dirs() for p in (*folder.glob("*.cc"), *_declared(folder))]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        assert path.is_file(), f"the build reads {path}, which does not exist"
        seen.add(path)
        for name in _INCLUDE.findall(path.read_text()):
            local = path.parent / name
            if local.is_file():
                todo.append(local)
            else:  # must come from JAX (the FFI headers), which the loader passes with -I
                assert (Path(jax.ffi.include_dir()) / name).is_file(), f"{path.name} includes {name!r}: not found"
    return seen


def test_build_inputs_found():
    inputs = {p.name for p in _build_inputs()}
    assert {"attention.cc", "common.h", "recurrent.h"} <= inputs, inputs  # the derivation itself works


def test_wheel_ships_what_the_kernel_build_reads(tmp_path):
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "runs", "workdir*"
    )
    shutil.copytree(ROOT, source, ignore=ignore)
    out = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = out.glob("seqjax-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    needed = {p.relative_to(PACKAGE.parent).as_posix() for p in _build_inputs()}
    assert not needed - shipped, f"the wheel lacks {sorted(needed - shipped)}"
