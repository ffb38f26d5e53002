"""Fixtures shared by the op tests: dtypes, sizes, and a parametrization over every backend.

TRITON_INTERPRET=1 is set here, before anything imports triton, so the Triton kernels run on
the CPU when there is no GPU (that is how they are tested in CI); on a GPU machine the triton
and cuda backends get CUDA tensors through the `device` fixture.
"""

from __future__ import annotations

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from _support import old_triton_interpreter  # noqa: E402
from fastmerge.ops._dispatch import available_backends  # noqa: E402

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
_BACKEND_PARAMS = [*ACCELERATED, *([pytest.param("triton", marks=pytest.mark.skip(reason=TRITON_UNTESTABLE))]
                                   if TRITON_UNTESTABLE else [])]


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(params=SIZES, ids=lambda n: f"n{n}")
def size(request) -> int:
    return request.param


@pytest.fixture(params=_BACKEND_PARAMS)
def backend(request) -> str:
    """Every usable backend that all ops share; each is checked against the reference."""
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    """Where a backend's tensors live: GPU backends on the GPU when there is one."""
    if backend in ("triton", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when both tensors have equal dtype, shape and bytes (stricter than torch.equal,
    which calls -0 == +0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8))


@pytest.fixture
def assert_same_bytes():
    def check(actual: torch.Tensor, expected: torch.Tensor) -> None:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
            f"{actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
        )
        if not same_bytes(actual, expected):
            diff = (actual.cpu().float() != expected.cpu().float()).nonzero()
            raise AssertionError(f"{len(diff)} elements differ, first at {diff[:3].tolist()}")

    return check


@contextlib.contextmanager
def native_threads(n: int):
    """Run the native kernels on n OpenMP threads inside the block, then restore the count (tests
    that results do not depend on it)."""
    from fastmerge import _native

    before = _native.max_threads()
    _native.set_num_threads(n)
    try:
        yield
    finally:
        _native.set_num_threads(before)
