"""The portable build (one per x86-64 level) gives the same bytes at every level, and the
module builds for aarch64.

`pip install` compiles for the building machine (-march=native), so a CI machine with AVX-512
only ever tests the AVX-512 code paths. Users' machines often have AVX2 only (most desktop
CPUs), or nothing beyond the x86-64 baseline: there the kernels take other paths (the AVX2
Philox, the AVX2 mask replay, loops the compiler vectorises differently or not at all). The
portable build (FASTMERGE_NATIVE_ARCH=OFF, what a wheel or a shared disk carries) compiles one
build per level into tmp_path (about 40 s on 2 cores); each test runs the native op tests and
the method tests in a fresh interpreter that imports fastmerge's compiled modules from that
build and picks a level with FASTMERGE_NATIVE_VARIANT. Those tests compare with the plain-torch
reference byte for byte, so a pass means the same bytes on every x86 CPU.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

import pytest

from op_support import REPO, build_native_modules

# Imports fastmerge's compiled modules (the builds, _cpu, _native_variants) from the build
# directory argv[1] instead of the installed ones, checks that fastmerge._native is the build
# FASTMERGE_NATIVE_VARIANT names, then runs pytest on the rest of argv.
RUN_WITH_BUILD = r"""
import importlib.util, os, pathlib, sys
build = pathlib.Path(sys.argv[1])

class BuildFinder:
    def find_spec(self, name, path=None, target=None):
        package, _, stem = name.rpartition(".")
        for candidate in build.glob(stem + ".*") if package == "fastmerge" else ():
            if candidate.name.split(".")[0] == stem and candidate.suffix in (".so", ".py"):
                return importlib.util.spec_from_file_location(name, candidate)
        return None

sys.meta_path.insert(0, BuildFinder())
from fastmerge import _native
assert _native.__name__ == "fastmerge." + os.environ["FASTMERGE_NATIVE_VARIANT"], _native.__name__
assert pathlib.Path(_native.__file__).parent == build, _native.__file__
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""

LEVELS = ("_native_v4_vpopcntdq", "_native_v4", "_native_v3", "_native_baseline")


@pytest.fixture(scope="module")
def portable_build(tmp_path_factory):
    build = tmp_path_factory.mktemp("portable")
    modules = build_native_modules(build, "-DFASTMERGE_NATIVE_ARCH=OFF")
    assert sorted(modules) == sorted(LEVELS)
    return build


def generated_variants(build):
    spec = importlib.util.spec_from_file_location("variants", build / "_native_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VARIANTS


x86_with_cmake = pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("cmake"),
                                    reason="needs an x86-64 machine and cmake")


@pytest.mark.slow
@x86_with_cmake
def test_the_portable_build_lists_each_level_with_its_features_fastest_first(portable_build):
    variants = generated_variants(portable_build)
    assert [name for name, _ in variants] == list(LEVELS)
    features = {name: set(found) for name, found in variants}
    assert {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma", "bmi2"} <= features["_native_v4"]
    assert features["_native_v4_vpopcntdq"] == features["_native_v4"] | {"avx512vpopcntdq"}
    assert {"avx2", "fma", "f16c", "bmi2", "movbe"} <= features["_native_v3"]
    assert not any(name.startswith("avx512") for name in features["_native_v3"])
    assert features["_native_baseline"] == set()  # x86-64 itself: SSE2, which every x86-64 CPU has
    flags = (portable_build / "CMakeFiles" / "_native_v3.dir" / "flags.make").read_text()
    assert "-march=x86-64-v3" in flags and "-march=native" not in flags


@pytest.mark.slow
@x86_with_cmake
@pytest.mark.parametrize("variant", ["_native_v3", "_native_baseline"], ids=["avx2", "baseline"])
def test_a_build_for_an_older_cpu_gives_the_reference_bytes(portable_build, variant):
    result = subprocess.run([sys.executable, "-c", RUN_WITH_BUILD, str(portable_build), "-q", "-p", "no:cacheprovider",
                             "tests/ops", "tests/methods", "-k", "native or methods"],
                            capture_output=True, text=True, cwd=REPO, timeout=1200,
                            env=dict(os.environ, FASTMERGE_NATIVE_VARIANT=variant))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("cmake")),
                    reason="needs the aarch64 cross compiler (apt install g++-aarch64-linux-gnu)")
def test_the_module_builds_for_aarch64_with_gcc(tmp_path):
    """ARM hosts (a GH200's Grace CPU, AWS Graviton) build the module with GCC too: no x86-only
    flag (-mprefer-vector-width) or type (_Float16 has no C++ form in GCC 12 for aarch64) may
    reach that compiler. Cross-compiled here, so it is built, not run."""
    build = tmp_path / "build"
    modules = build_native_modules(build, "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                                   "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++", f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
                                   "-DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=NEVER", "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER",
                                   "-DCMAKE_FIND_ROOT_PATH_MODE_PACKAGE=NEVER")
    for module in [*modules.values(), *build.glob("_cpu*.so")]:
        assert module.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine: EM_AARCH64
    # No x86 feature to check there: the one build is loaded as it is.
    assert generated_variants(build) == (("_native_host", ()),)
