"""fastmerge._native loads a build of the kernels that the running CPU can execute.

A build compiled for features the CPU lacks would die of SIGILL in its first vector loop; the
loader compares each build's recorded features with the CPU's (fastmerge._cpu) and otherwise
raises an ImportError that says what is missing, after which the ops run on the reference with
a warning. The portable builds themselves are built and run in test_isa_builds.py.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fastmerge.native_loader import choose_variant

# test_isa_builds.py runs these tests with a build directory's modules and a build forced by
# name; there the installed build is not the one loaded, and child processes see the installation.
skip_when_a_build_is_forced = pytest.mark.skipif(bool(os.environ.get("FASTMERGE_NATIVE_VARIANT")),
                                                 reason="a build is forced by name (test_isa_builds.py)")

VARIANTS = (("fast", ("avx2", "avx512f")), ("middle", ("avx2",)), ("slow", ()))


def cpu_with(*features):
    return lambda feature: feature in features


def test_the_first_build_whose_features_the_cpu_has_is_chosen():
    assert choose_variant(VARIANTS, cpu_with("avx2", "avx512f")) == "fast"
    assert choose_variant(VARIANTS, cpu_with("avx2", "fma")) == "middle"
    assert choose_variant(VARIANTS, cpu_with()) == "slow"


def test_a_build_can_be_forced_by_name_only_where_the_cpu_runs_it():
    assert choose_variant(VARIANTS, cpu_with("avx2", "avx512f"), forced="slow") == "slow"
    with pytest.raises(ImportError, match=r"FASTMERGE_NATIVE_VARIANT='fast' needs CPU features this CPU lacks: avx512f"):
        choose_variant(VARIANTS, cpu_with("avx2"), forced="fast")
    with pytest.raises(ImportError, match=r"'fastest' is not a build in this installation; the builds are fast, middle, slow"):
        choose_variant(VARIANTS, cpu_with("avx2"), forced="fastest")


def test_a_cpu_that_no_build_fits_gets_the_missing_features_and_the_remedy():
    with pytest.raises(ImportError) as caught:
        choose_variant((("_native_host", ("avx2", "avx512f", "avx512bw")),), cpu_with("avx2"))
    message = str(caught.value)
    assert "_native_host needs avx512f, avx512bw" in message
    assert "Reinstall fastmerge on this machine" in message and "FASTMERGE_NATIVE_ARCH=OFF" in message


@skip_when_a_build_is_forced
def test_the_installed_build_is_the_first_this_cpu_can_run():
    from fastmerge import _cpu, _native
    from fastmerge._native_variants import VARIANTS as installed

    runnable = [name for name, features in installed if all(_cpu.supports(feature) for feature in features)]
    assert _native.__name__ == f"fastmerge.{runnable[0]}"
    assert all(set(features) <= set(_cpu.known_features()) for _, features in installed)


# /proc/cpuinfo's names for some features, where they differ from __builtin_cpu_supports'.
CPUINFO_NAMES = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi2": "bmi2", "movbe": "movbe",
                 "sse4.2": "sse4_2", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
                 "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16"}


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(),
                    reason="compares with Linux's /proc/cpuinfo on x86-64")
def test_the_feature_check_agrees_with_the_kernels_cpu_flags():
    from fastmerge import _cpu

    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split(":", 1)[1].split())
    known = set(_cpu.known_features())  # a Clang before 16 cannot check f16c, movbe, avx512fp16 (CMakeLists.txt)
    assert {"avx2", "fma", "bmi2", "avx512f", "avx512vpopcntdq"} <= known
    for feature, flag in CPUINFO_NAMES.items():
        if feature in known:
            assert _cpu.supports(feature) == (flag in flags), feature


def test_an_unknown_feature_name_is_refused():
    from fastmerge import _cpu

    with pytest.raises(ValueError, match="unknown CPU feature 'avx9000'"):
        _cpu.supports("avx9000")


PROBE = r"""
import json, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from fastmerge import ops
    backends = ops.available_backends()
a, b = torch.ones(5), torch.full((5,), 3.0)
merged = ops.blend([a, b], [0.25, 0.75])
print(json.dumps({"backends": backends, "warnings": [str(w.message) for w in caught], "merged": merged.tolist()}))
"""


def run_probe(variant: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env=dict(os.environ, FASTMERGE_NATIVE_VARIANT=variant))
    return json.loads(done.stdout)


@skip_when_a_build_is_forced
def test_without_a_usable_build_the_ops_warn_and_run_on_the_reference():
    report = run_probe("_native_nonexistent")
    assert "native" not in report["backends"] and "reference" in report["backends"]
    (warning,) = report["warnings"]
    assert "native kernels are unavailable" in warning and "'_native_nonexistent' is not a build" in warning
    assert report["merged"] == [2.5] * 5


@skip_when_a_build_is_forced
def test_a_build_named_in_the_environment_is_used():
    from fastmerge._native_variants import VARIANTS as installed

    report = run_probe(installed[-1][0])  # the slowest build, which every CPU of its kind runs
    assert "native" in report["backends"] and report["warnings"] == []
    assert report["merged"] == [2.5] * 5
