"""The native module built for older x86 CPUs gives the same bytes, and builds for aarch64.

`pip install` compiles for the building machine (-march=native), so a CI machine with AVX-512
only ever tests the AVX-512 code paths. Users' machines often have AVX2 only (most desktop
CPUs), or nothing beyond the x86-64 baseline: there the kernels take other paths (the AVX2
Philox, the AVX2 mask replay, loops the compiler vectorises differently or not at all). Each
test builds the module for one such target into tmp_path (about a minute on 2 cores) and runs
the native op tests and the method tests against it in a fresh interpreter, where the built
module stands in for the installed `fastmerge._native`. Those tests compare with the plain-torch
reference byte for byte, so a pass means the same bytes on every x86 CPU.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import sysconfig

import pytest

from op_support import REPO, build_native_module

# Loads the built module as fastmerge._native before fastmerge is imported, then runs pytest.
RUN_WITH_MODULE = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fastmerge._native", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["fastmerge._native"] = module
import fastmerge
fastmerge._native = module  # what importing the submodule sets
from fastmerge import _native
import pytest
assert _native is module
sys.exit(pytest.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("cmake"), reason="needs an x86-64 machine and cmake")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2", "baseline"])
def test_a_build_for_an_older_cpu_gives_the_reference_bytes(tmp_path, march):
    build = tmp_path / "build"
    module = build_native_module(build, "-DFASTMERGE_NATIVE_ARCH=OFF", f"-DCMAKE_CXX_FLAGS=-march={march}")
    flags = (build / "CMakeFiles" / "_native.dir" / "flags.make").read_text()
    assert f"-march={march}" in flags and "-march=native" not in flags

    result = subprocess.run([sys.executable, "-c", RUN_WITH_MODULE, str(module), "-q", "-p", "no:cacheprovider",
                             "tests/ops", "tests/methods", "-k", "native or methods"],
                            capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("cmake")),
                    reason="needs the aarch64 cross compiler (apt install g++-aarch64-linux-gnu)")
def test_the_module_builds_for_aarch64_with_gcc(tmp_path):
    """ARM hosts (a GH200's Grace CPU, AWS Graviton) build the module with GCC too: no x86-only
    flag (-mprefer-vector-width) or type (_Float16 has no C++ form in GCC 12 for aarch64) may
    reach that compiler. Cross-compiled here, so it is built, not run."""
    module = build_native_module(tmp_path / "build", "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                                 "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++", f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
                                 "-DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=NEVER", "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER",
                                 "-DCMAKE_FIND_ROOT_PATH_MODE_PACKAGE=NEVER")
    assert module.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine: EM_AARCH64
