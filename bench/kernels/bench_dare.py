"""DARE-TIES speed: fused native kernel (Philox draws recomputed per element, L1 rescale) vs torch
eager (bernoulli masks, materialised deltas). Same inputs as bench_ties.py (FASTMERGE_BENCH_N),
and the same with sparse fine-tunes (`*_sparse`: 90% of each fine-tune's weights equal the base's,
as in an RL fine-tune), where the native L1 pass draws only at the changed weights.

Run: python -m pytest bench/kernels/bench_dare.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from fastmerge.ops import ties_merge

from .bench_ties import DENSITY, K, N, WEIGHTS, consensus_merge, make_inputs, models  # noqa: F401  (fixture)

UNCHANGED = 0.9


@pytest.fixture(scope="module")
def sparse_models():
    """bench_ties.py's inputs with UNCHANGED of each fine-tune's weights set back to the base's."""
    base, xs = make_inputs(N)
    gen = torch.Generator().manual_seed(1)
    return base, [torch.where(torch.rand(N, generator=gen) < UNCHANGED, base, x) for x in xs]


def torch_dare_ties(base, xs, gen):
    deltas = []
    for x in xs:
        d = x.float() - base.float()
        kept = d * torch.bernoulli(torch.full_like(d, DENSITY), generator=gen)
        deltas.append(kept * (d.abs().sum(dtype=torch.float64) / kept.abs().sum(dtype=torch.float64)).float())
    return consensus_merge(base, deltas, WEIGHTS, normalize=False)


def native_dare_ties(base, xs):
    return ties_merge(base, xs, WEIGHTS, densities=[DENSITY] * K, sparsify="random", rescale=True, normalize=False,
                      seed=1, tensor_name="bench", backend="native")


def test_dare_ties_torch(benchmark, models):  # noqa: F811
    base, xs = models
    benchmark.pedantic(torch_dare_ties, args=(base, xs, torch.Generator().manual_seed(0)), rounds=1, iterations=1)


def test_dare_ties_native(benchmark, models):  # noqa: F811
    benchmark.pedantic(native_dare_ties, args=models, rounds=3, iterations=1)


def test_dare_ties_torch_sparse(benchmark, sparse_models):
    base, xs = sparse_models
    benchmark.pedantic(torch_dare_ties, args=(base, xs, torch.Generator().manual_seed(0)), rounds=1, iterations=1)


def test_dare_ties_native_sparse(benchmark, sparse_models):
    benchmark.pedantic(native_dare_ties, args=sparse_models, rounds=3, iterations=1)
