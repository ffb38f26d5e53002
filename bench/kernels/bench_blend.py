"""Blend speed: the native kernel vs torch eager (`sum(w * x.float())`, the obvious chain).
4 bf16 inputs of FASTMERGE_BENCH_N elements (default 64M), bf16 output.

Run: python -m pytest bench/kernels/bench_blend.py --benchmark-only
(FASTMERGE_BENCH_N=4000000 for a quick run). Each benchmark records GB/s (bytes read + written
over the best time) in extra_info; the native one also records its speed-up over torch eager
measured in the same run (the torch test runs first). Correctness is tests/ops/test_blend.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastmerge.ops import blend

N = int(os.environ.get("FASTMERGE_BENCH_N", 64 * 1024 * 1024))
K = 4
WEIGHTS = [0.4, 0.3, 0.2, 0.1]
BYTES = (K + 1) * N * 2  # K bf16 inputs read, one bf16 output written
_best_seconds: dict[str, float] = {}


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(N, generator=gen).to(torch.bfloat16) for _ in range(K)]


def _record(benchmark, name: str) -> None:
    best = benchmark.stats.stats.min
    _best_seconds[name] = best
    benchmark.extra_info["GB/s"] = round(BYTES / best / 1e9, 2)


def test_blend_torch_eager(benchmark, inputs):
    def eager():
        return sum(w * x.float() for w, x in zip(WEIGHTS, inputs)).to(torch.bfloat16)

    benchmark.pedantic(eager, rounds=3, warmup_rounds=1)
    _record(benchmark, "torch")


def test_blend_native(benchmark, inputs):
    out = torch.empty(N, dtype=torch.bfloat16)
    benchmark.pedantic(lambda: blend(inputs, WEIGHTS, backend="native", out=out), rounds=5, warmup_rounds=1)
    _record(benchmark, "native")
    if "torch" in _best_seconds:
        benchmark.extra_info["speedup_vs_torch"] = round(_best_seconds["torch"] / _best_seconds["native"], 2)


def test_blend_native_allocating(benchmark, inputs):
    """Same, but letting blend allocate its output (page faults on a fresh 128 MB buffer)."""
    benchmark.pedantic(lambda: blend(inputs, WEIGHTS, backend="native"), rounds=5, warmup_rounds=1)
    _record(benchmark, "native_alloc")
