"""The dispatch rules: a call's own backend, and the one fallback rule for helper ops."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fastmerge.errors import KernelError
from fastmerge.ops._dispatch import backend_usable, helper_backend, resolve_backend

CPU = torch.device("cpu")
CPU_DEFAULT = "native" if backend_usable("native") else "reference"


def test_resolve_backend_defaults_to_native_on_cpu_and_rejects_what_the_op_lacks(monkeypatch):
    monkeypatch.delenv("FASTMERGE_BACKEND", raising=False)
    x = torch.zeros(3)
    assert resolve_backend("op", [x], ("reference", "native")) == CPU_DEFAULT
    assert resolve_backend("op", [x], ("reference",)) == "reference"
    with pytest.raises(KernelError, match="op has no 'triton' backend"):
        resolve_backend("op", [x], ("reference", "native"), "triton")
    with pytest.raises(KernelError, match="unknown backend 'fast'"):
        resolve_backend("op", [x], ("reference", "native"), "fast")


def test_resolve_backend_refuses_tensors_the_kernels_cannot_read(monkeypatch):
    monkeypatch.delenv("FASTMERGE_BACKEND", raising=False)
    with pytest.raises(KernelError, match="op: a tensor is on meta; fastmerge's kernels take CPU or CUDA tensors"):
        resolve_backend("op", [torch.zeros(3), torch.zeros(3, device="meta")], ("reference", "native"))
    if backend_usable("native"):
        on_gpu = SimpleNamespace(device=torch.device("cuda"))  # only its device is read
        with pytest.raises(KernelError, match="op: the native backend cannot read a tensor on cuda"):
            resolve_backend("op", [torch.zeros(3), on_gpu], ("reference", "native"), "native")


def test_a_merge_of_meta_tensors_is_an_error_not_a_crash():
    # In a child process: before the check, the native blend read the meta tensors' null data
    # pointers and the process died of a segmentation fault.
    code = ("import torch, fastmerge\n"
            "x = torch.zeros(5, 7, device='meta')\n"
            "try:\n"
            "    fastmerge.merge_tensors('linear', [x, x], weight=[0.5, 0.5])\n"
            "except fastmerge.FastmergeError as exc:\n"
            "    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "blend: a tensor is on meta" in result.stdout


@pytest.mark.parametrize("run_backend, expected", [
    ("reference", "reference"),            # the oracle is forced end to end
    ("native", CPU_DEFAULT),               # kept where the helper has it
    ("triton", CPU_DEFAULT),               # no such helper kernel: the device's default
    (None, CPU_DEFAULT),
])
def test_helper_backend_keeps_the_run_backend_where_it_can(monkeypatch, run_backend, expected):
    monkeypatch.delenv("FASTMERGE_BACKEND", raising=False)
    assert helper_backend(CPU, ("reference", "native", "cuda"), run_backend) == expected


def test_helper_backend_reads_the_environment_when_the_run_names_none(monkeypatch):
    monkeypatch.setenv("FASTMERGE_BACKEND", "reference")
    assert helper_backend(CPU, ("reference", "native"), None) == "reference"
    # An explicit run backend wins over the environment.
    assert helper_backend(CPU, ("reference", "native"), "native") == CPU_DEFAULT


def test_helper_backend_never_picks_an_unusable_backend(monkeypatch):
    monkeypatch.delenv("FASTMERGE_BACKEND", raising=False)
    if backend_usable("cuda"):
        pytest.skip("checks the fallback on a build without a usable cuda backend")
    assert helper_backend(CPU, ("reference", "native", "cuda"), "cuda") == CPU_DEFAULT
