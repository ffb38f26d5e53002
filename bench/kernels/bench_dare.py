"""DARE-TIES speed: fused native kernel (Philox draws recomputed per element, L1 rescale) vs torch
eager (bernoulli masks, materialised deltas). Same inputs as bench_ties.py (FASTMERGE_BENCH_N).

Run: python -m pytest bench/kernels/bench_dare.py --benchmark-only
"""

from __future__ import annotations

import torch

from fastmerge.ops import ties_merge

from .bench_ties import DENSITY, K, WEIGHTS, consensus_merge, models  # noqa: F401  (fixture)


def torch_dare_ties(base, xs, gen):
    deltas = []
    for x in xs:
        d = x.float() - base.float()
        kept = d * torch.bernoulli(torch.full_like(d, DENSITY), generator=gen)
        deltas.append(kept * (d.abs().sum(dtype=torch.float64) / kept.abs().sum(dtype=torch.float64)).float())
    return consensus_merge(base, deltas, WEIGHTS, normalize=False)


def test_dare_ties_torch(benchmark, models):  # noqa: F811
    base, xs = models
    benchmark.pedantic(torch_dare_ties, args=(base, xs, torch.Generator().manual_seed(0)), rounds=1, iterations=1)


def test_dare_ties_native(benchmark, models):  # noqa: F811
    base, xs = models
    kw = dict(densities=[DENSITY] * K, sparsify="random", rescale=True, normalize=False, seed=1,
              tensor_name="bench", backend="native")
    benchmark.pedantic(ties_merge, args=(base, xs, WEIGHTS), kwargs=kw, rounds=3, iterations=1)
