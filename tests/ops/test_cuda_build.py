"""The CUDA variant of the native module (FASTMERGE_CUDA=ON) builds, imports without a usable GPU
and says so, and the ops fall back cleanly when the cuda backend is absent.

The build test compiles the whole module with cmake into tmp_path (about 1.5 min on 2 cores)
and imports it in a fresh interpreter with CUDA_VISIBLE_DEVICES="" so it must report no device
on any machine, GPU or not. What it cannot check without a GPU: that the kernels compute the
right histogram (tests/ops/test_threshold.py does that through the `cuda` backend on a GPU box).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastmerge.errors import KernelError
from fastmerge.ops._dispatch import available_backends, resolve_backend
from fastmerge.ops.threshold import BACKENDS, magnitude_threshold
from op_support import build_native_modules

# Loads the built module from a path (not the installed fastmerge._native) and reports on it.
PROBE = r"""
import importlib.util, json, pathlib, sys
spec = importlib.util.spec_from_file_location(pathlib.Path(sys.argv[1]).name.split(".")[0], sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
report = {"has_cuda": m.has_cuda(), "bound": hasattr(m, "cuda_magnitude_histogram")}
for name, args in {"no_device": (1, 0, 0, 0, 10, 1, 1, 1, 0, 0, 0),
                   "bad_dtype": (1, 9, 0, 0, 10, 1, 1, 1, 0, 0, 0)}.items():
    try:
        m.cuda_magnitude_histogram(*args)
        report[name] = "returned"
    except Exception as exc:
        report[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(report))
"""


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("cmake")), reason="needs nvcc and cmake")
def test_cuda_variant_builds_and_imports_without_a_device(tmp_path):
    build = tmp_path / "build"
    module = str(build_native_modules(build, "-DFASTMERGE_CUDA=ON")["_native_host"])
    flags = (build / "CMakeFiles" / "fastmerge_cuda.dir" / "flags.make").read_text()
    assert "sm_80" in flags and "sm_90" in flags

    if shutil.which("readelf"):  # the runtime is static: nothing to find at import time
        needed = subprocess.run(["readelf", "-d", module], check=True, capture_output=True, text=True).stdout
        assert "libcudart" not in needed

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    probe = subprocess.run([sys.executable, "-c", PROBE, module], check=True, capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    report = json.loads(probe.stdout)
    assert report["has_cuda"] is False and report["bound"] is True
    assert report["no_device"].startswith("RuntimeError: cudaSetDevice")
    assert report["bad_dtype"] == "ValueError: unknown input dtype code"


def test_has_cuda_is_bound_and_gates_the_cuda_backend():
    from fastmerge import _native

    assert isinstance(_native.has_cuda(), bool)  # bound in every build, CUDA or not
    if not (_native.has_cuda() and torch.cuda.is_available()):
        assert "cuda" not in available_backends()


@pytest.mark.skipif("cuda" in available_backends(), reason="checks the fallback with no cuda backend")
def test_without_the_cuda_backend_ops_fall_back_or_refuse():
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert resolve_backend("magnitude_threshold", [x], BACKENDS) == ("native" if "native" in available_backends()
                                                                      else "reference")
    with pytest.raises(KernelError, match="'cuda' is not usable here"):
        magnitude_threshold(x, 10, backend="cuda")
