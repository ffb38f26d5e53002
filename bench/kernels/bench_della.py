"""DELLA keep-mask speed: the native kernel (rows ranked by counting, vector Philox draws) vs torch
eager (a stable argsort of each row's |d| and its inverse for the ranks, uniform draws, one
compare), as mergekit computes it. One bf16 fine-tune against its base, FASTMERGE_BENCH_N
elements (default 64M) in rows of 2048, task-vector steps of a few bf16 ulps as in a fine-tune.
Also the native Philox draws alone for as many elements (one per element, the contract's
`tl.rand` stream): the part of the mask that no ranking design can remove.

Run: python -m pytest bench/kernels/bench_della.py --benchmark-only
The native mask is checked against the reference in tests/ops/test_ties.py; here only the speed
is measured.
"""

from __future__ import annotations

import pytest
import torch

from fastmerge.ops.ties import _native_della_keep, della_fibres

from .bench_ties import N

ROW = 2048
DENSITY, EPSILON = 0.5, 0.1


@pytest.fixture(scope="module")
def tensors():
    gen = torch.Generator().manual_seed(0)
    shape = (max(1, N // ROW), ROW)
    base = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    x = (base.float() + torch.randn(shape, generator=gen) * 0.002).to(torch.bfloat16)
    return x, base


def torch_della_keep(x, base, gen):
    a = (x.float() - base.float()).abs()
    rank = torch.argsort(torch.argsort(a, dim=1, stable=True), dim=1)
    p = (DENSITY - EPSILON) + 2 * EPSILON * rank.double() / (a.shape[1] - 1)
    return torch.rand(a.shape, generator=gen, dtype=torch.float64) < p


def test_della_mask_torch(benchmark, tensors):
    x, base = tensors
    benchmark.pedantic(torch_della_keep, args=(x, base, torch.Generator().manual_seed(0)), rounds=1, iterations=1)


def test_della_mask_native(benchmark, tensors):
    x, base = tensors
    benchmark.pedantic(_native_della_keep, args=(x, base, della_fibres(x.shape), DENSITY, EPSILON, 7),
                       rounds=3, iterations=1)


def test_della_draws_alone_native(benchmark, tensors):
    from fastmerge import _native

    out = torch.zeros(tensors[0].numel())  # written once here, so no page faults are timed
    benchmark.pedantic(_native.philox_fill, args=(out.data_ptr(), 7, 0, out.numel()), rounds=3, iterations=1)
