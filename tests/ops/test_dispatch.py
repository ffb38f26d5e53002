"""The dispatch rules: a call's own backend, and the one fallback rule for helper ops."""

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
