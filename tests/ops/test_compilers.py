"""The kernels build with Clang, and without OpenMP, and give the reference's bytes.

Every other build test uses GCC with OpenMP. Apple's Clang (macOS) has no OpenMP, nor has
Clang on Linux without libomp: there the kernels build anyway, every kernel runs on one thread
(csrc/threads.h), and `fastmerge --version` says so. Clang (`apt-get install clang`, as
`.ci/run` does) builds the module here with OpenMP disabled, and the native op tests and the
method tests, which compare with the plain-torch reference byte for byte, run on that build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from op_support import BUILD_FINDER, REPO, RUN_WITH_BUILD, build_native_modules

CLANG = shutil.which("clang++")
needs_clang = pytest.mark.skipif(not CLANG or not shutil.which("cmake"), reason="needs clang++ and cmake")

# argv[1]: a build directory. What its kernels say of their threads, after asking for two.
THREADS_PROBE = BUILD_FINDER + r"""
import json
import_from_build(pathlib.Path(sys.argv[1]))
from fastmerge import _native
from fastmerge.native_loader import describe_native
_native.set_num_threads(2)
print(json.dumps({"name": _native.__name__, "has_openmp": _native.has_openmp, "threads": _native.max_threads(),
                  "describe": describe_native()}))
"""


@pytest.fixture(scope="module")
def clang_build_without_openmp(tmp_path_factory):
    build = tmp_path_factory.mktemp("clang-without-openmp")
    modules = build_native_modules(build, f"-DCMAKE_CXX_COMPILER={CLANG}", "-DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON")
    assert sorted(modules) == ["_native_host"]
    flags = (build / "CMakeFiles" / "_native_host.dir" / "flags.make").read_text().split()
    assert "-fopenmp-simd" in flags and "-fopenmp" not in flags  # OpenMP's simd hints only, no runtime
    return build


@pytest.mark.slow
@needs_clang
def test_without_openmp_the_kernels_run_on_one_thread_and_say_so(clang_build_without_openmp):
    result = subprocess.run([sys.executable, "-c", THREADS_PROBE, str(clang_build_without_openmp)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout)
    assert probe["name"] == "fastmerge._native_host"
    assert probe["has_openmp"] is False and probe["threads"] == 1
    assert "without OpenMP" in probe["describe"] and "one thread" in probe["describe"]


@pytest.mark.slow
@needs_clang
def test_a_clang_build_without_openmp_gives_the_reference_bytes(clang_build_without_openmp):
    result = subprocess.run([sys.executable, "-c", RUN_WITH_BUILD, str(clang_build_without_openmp), "-q", "-p",
                             "no:cacheprovider", "tests/ops", "tests/methods", "-k", "native or methods"],
                            capture_output=True, text=True, cwd=REPO, timeout=1200,
                            env=dict(os.environ, FASTMERGE_NATIVE_VARIANT="_native_host"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
