"""apply_mask speed: native (packed and dense mask) vs torch eager `torch.where(mask, x * s, 0)`.
One bf16 tensor of FASTMERGE_BENCH_N elements (default 64M).

Run: python -m pytest bench/kernels/bench_mask.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest
import torch

from fastmerge.ops import apply_mask, pack_mask

N = int(os.environ.get("FASTMERGE_BENCH_N", 64 * 1024 * 1024))


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, generator=gen).to(torch.bfloat16)
    keep = torch.rand(N, generator=gen) < 0.5
    return x, keep, pack_mask(keep)


def test_mask_torch_eager(benchmark, data):
    x, keep, _ = data
    benchmark.pedantic(lambda: torch.where(keep, x.float() * 2.0, 0.0).to(torch.bfloat16), rounds=3, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = round((4 * N + N) / benchmark.stats.stats.min / 1e9, 2)


@pytest.mark.parametrize("form", ("dense", "packed"))
def test_mask_native(benchmark, data, form):
    x, keep, packed = data
    out = torch.empty_like(x)
    mask = keep if form == "dense" else packed
    benchmark.pedantic(lambda: apply_mask(x, mask, 2.0, out=out, backend="native"), rounds=5, warmup_rounds=1)
    mask_bytes = N if form == "dense" else N // 8
    benchmark.extra_info["GB/s"] = round((4 * N + mask_bytes) / benchmark.stats.stats.min / 1e9, 2)
