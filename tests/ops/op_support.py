"""Constants and helpers of the op tests, imported by name (`from op_support import ...`).

They live here, not in conftest.py, because every test folder's conftest is a module called
`conftest`: when one pytest run collects tests/ops with another folder that has a conftest
(tests/io), `from conftest import ...` can get the other one.
tests/ops/conftest.py sets TRITON_INTERPRET before this module is first imported.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _support import REPO, old_triton_interpreter
from fastmerge.ops._dispatch import available_backends

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Empty, scalar-like, odd, one past a power of two; the big size only for CPU backends since
# the Triton interpreter runs in Python.
SIZES = (0, 1, 7, 4097)
BIG_SIZE = (1 << 20) + 3


def _why_triton_is_untestable() -> str:
    """Why the Triton kernels cannot be checked byte for byte here, or "" when they can (a GPU
    compiles them; only an old interpreter cannot)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in available_backends():
        return ""
    return old_triton_interpreter()


TRITON_UNTESTABLE = _why_triton_is_untestable()
# Backends every op has. `cuda` exists only for some ops (the histogram threshold), whose
# tests parametrize over their own BACKENDS. An untestable triton is listed as skipped, so the
# run says why.
ACCELERATED = tuple(b for b in available_backends() if b in ("native", "triton") and not (b == "triton" and TRITON_UNTESTABLE))
BACKEND_PARAMS = [*ACCELERATED, *([pytest.param("triton", marks=pytest.mark.skip(reason=TRITON_UNTESTABLE))]
                                  if TRITON_UNTESTABLE else [])]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when both tensors have equal dtype, shape and bytes (stricter than torch.equal,
    which calls -0 == +0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8))


@contextlib.contextmanager
def native_threads(n: int):
    """Run the native kernels on n OpenMP threads inside the block, then restore the count (tests
    that results do not depend on it). Yields the count the kernels then use: 1 in a build
    without OpenMP (tests/ops/test_compilers.py)."""
    from fastmerge import _native

    before = _native.max_threads()
    _native.set_num_threads(n)
    try:
        yield _native.max_threads()
    finally:
        _native.set_num_threads(before)


# Makes `import fastmerge.<name>` find the compiled modules (the builds, _cpu, _native_variants)
# in a build directory before the installed ones: import_from_build(directory).
BUILD_FINDER = r"""
import importlib.util, pathlib, sys

class BuildFinder:
    def __init__(self, build):
        self.build = build

    def find_spec(self, name, path=None, target=None):
        package, _, stem = name.rpartition(".")
        for candidate in self.build.glob(stem + ".*") if package == "fastmerge" else ():
            if candidate.name.split(".")[0] == stem and candidate.suffix in (".so", ".py"):
                return importlib.util.spec_from_file_location(name, candidate)
        return None

def import_from_build(build):
    sys.meta_path.insert(0, BuildFinder(build))
"""

# With the build directory argv[1]: checks that fastmerge._native is the build that
# FASTMERGE_NATIVE_VARIANT names, then runs pytest on the rest of argv. The tests' own child
# interpreters are FASTMERGE_TEST_PYTHON where that is set (the aarch64 Python, under qemu too).
RUN_WITH_BUILD = BUILD_FINDER + r"""
import os
sys.executable = os.environ.get("FASTMERGE_TEST_PYTHON", sys.executable)
build = pathlib.Path(sys.argv[1])
import_from_build(build)
from fastmerge import _native
assert _native.__name__ == "fastmerge." + os.environ["FASTMERGE_NATIVE_VARIANT"], _native.__name__
assert pathlib.Path(_native.__file__).parent == build, _native.__file__
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""

def build_native_modules(build: Path, *cmake_args: str) -> dict[str, Path]:
    """The builds of the kernels made with cmake into `build` from the repository's CMakeLists,
    for this Python and its pybind11, configured with `cmake_args` besides (the build tests'
    variants), by module name (`_native_host`, `_native_v3`, ...; `_cpu` and the generated
    `_native_variants.py` lie beside them); a failed step is an AssertionError carrying the
    tool's output."""
    pybind11_dir = subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"], check=True,
                                  capture_output=True, text=True).stdout.strip()
    configure = ["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-Dpybind11_DIR={pybind11_dir}",
                 f"-DPython_EXECUTABLE={sys.executable}", *cmake_args]
    for step in (configure, ["cmake", "--build", str(build), "-j", str(min(os.cpu_count() or 1, 4))]):
        done = subprocess.run(step, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {module.name.split(".")[0]: module for module in build.glob("_native_*.so")}
