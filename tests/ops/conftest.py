"""Fixtures shared by the op tests: dtypes, sizes, and a parametrization over every backend.

TRITON_INTERPRET=1 is set here, before anything imports triton, so the Triton kernels run on
the CPU when there is no GPU (that is how they are tested in CI); on a GPU machine the triton
and cuda backends get CUDA tensors through the `device` fixture.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from op_support import BACKEND_PARAMS, FLOAT_DTYPES, SIZES, same_bytes  # noqa: E402


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(params=SIZES, ids=lambda n: f"n{n}")
def size(request) -> int:
    return request.param


@pytest.fixture(params=BACKEND_PARAMS)
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
