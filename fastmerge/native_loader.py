"""Which build of the native kernels (csrc/) the running CPU can execute.

The kernels are compiled for particular CPU features: by default for the installing machine's
(-march=native), or, built with FASTMERGE_NATIVE_ARCH=OFF, once per x86-64 level. Code compiled
for a feature the CPU lacks dies of an illegal instruction (SIGILL, no Python error), as early as
its import: a virtual environment on a cluster's shared disk, built on an AVX-512 login node and
run on an AVX2 compute node, would (tests/ops/test_isa_builds.py emulates such a CPU with qemu).
Each build's features are listed in the generated `_native_variants`; load_native imports the
first (fastest) build whose features `_cpu` (compiled for the architecture's baseline, so it runs
anywhere) finds on this CPU, and fastmerge/_native.py stands in as that module, so
`fastmerge._native` *is* the chosen build.

FASTMERGE_NATIVE_VARIANT=<name> picks a build by name, e.g. to benchmark or test a slower one.
A CPU that none of the builds fits gets an ImportError naming the missing features; the ops then
fall back to the plain-torch reference (ops/_dispatch.py warns).
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Sequence

VARIANT_VARIABLE = "FASTMERGE_NATIVE_VARIANT"


def missing_features(features: Sequence[str], supports: Callable[[str], bool]) -> list[str]:
    """Those of a build's `features` that this CPU lacks (`supports` asks the CPU)."""
    return [feature for feature in features if not supports(feature)]


def runnable_variants(variants: Sequence[tuple[str, Sequence[str]]], supports: Callable[[str], bool]) -> list[str]:
    """The names of the builds in `variants` ((name, features), fastest first) that this CPU can
    run, in the same order."""
    return [name for name, features in variants if not missing_features(features, supports)]


def choose_variant(variants: Sequence[tuple[str, Sequence[str]]], supports: Callable[[str], bool],
                   forced: str | None = None) -> str:
    """The name of the first build in `variants` ((name, features), fastest first) whose every
    feature `supports`, or of `forced` if this CPU can run it; ImportError otherwise."""
    builds = dict(variants)
    if forced:
        if forced not in builds:
            raise ImportError(f"{VARIANT_VARIABLE}={forced!r} is not a build in this installation; "
                              f"the builds are {', '.join(builds)}")
        lacking = missing_features(builds[forced], supports)
        if lacking:
            raise ImportError(f"{VARIANT_VARIABLE}={forced!r} needs CPU features this CPU lacks: {', '.join(lacking)}")
        return forced
    runnable = runnable_variants(variants, supports)
    if runnable:
        return runnable[0]
    lacking = "; ".join(f"{name} needs {', '.join(missing_features(features, supports))}" for name, features in variants)
    raise ImportError(f"fastmerge's native kernels were compiled for a CPU with features this CPU lacks ({lacking}). "
                      "Reinstall fastmerge on this machine (it compiles for the installing CPU), or build the "
                      "portable variants: pip install . -C cmake.define.FASTMERGE_NATIVE_ARCH=OFF")


def load_native():
    """The build of the kernels chosen for this CPU, imported."""
    from . import _cpu
    from ._native_variants import VARIANTS

    name = choose_variant(VARIANTS, _cpu.supports, os.environ.get(VARIANT_VARIABLE) or None)
    return importlib.import_module(f"{__package__}.{name}")


def describe_native() -> str:
    """One line on the native kernels this process gets: the build's name, or why there is none
    (for `fastmerge --version`, since a merge's speed depends on it)."""
    try:
        from . import _native
    except ImportError as error:
        return f"native kernels: none usable here ({error})"
    name = _native.__name__.rpartition(".")[2]
    if not _native.has_openmp:
        return (f"native kernels: {name}, built without OpenMP, so on one thread (install the compiler's OpenMP "
                "runtime, e.g. libomp, and reinstall fastmerge for all cores)")
    return f"native kernels: {name}"
