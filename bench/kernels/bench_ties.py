"""TIES speed: the fused native kernel vs a torch eager implementation that trims with topk, as
mergekit does. 4 bf16 inputs + base of FASTMERGE_BENCH_N elements (default 64M), density 0.2.

Also the selection alone of breadcrumbs' two thresholds per model (test_outlier_band_selection_native).

Run: python -m pytest bench/kernels/bench_ties.py --benchmark-only
(set FASTMERGE_BENCH_N=4000000 for a quick run). The native result is checked against the
reference on a slice-sized problem in tests/ops/test_ties.py; here only the speed is measured.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastmerge.ops import ties_merge

N = int(os.environ.get("FASTMERGE_BENCH_N", 64 * 1024 * 1024))
K = 4
DENSITY = 0.2
WEIGHTS = [0.4, 0.3, 0.2, 0.1]


def make_inputs(n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16 base of n elements and K fine-tunes 0.01 away from it (also bench/gpu_kernels.py's)."""
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(n, generator=gen, device=device).to(torch.bfloat16)
    xs = [(base.float() + torch.randn(n, generator=gen, device=device) * 0.01).to(torch.bfloat16) for _ in range(K)]
    return base, xs


@pytest.fixture(scope="module")
def models():
    return make_inputs(N)


def topk_trim(d: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit-style magnitude trimming: keep the top int(density*n) |d| via torch.topk."""
    k = int(density * d.numel())
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[torch.topk(d.abs(), k, sorted=False).indices] = True
    return d * keep


def consensus_merge(base: torch.Tensor, deltas: list[torch.Tensor], weights, normalize: bool) -> torch.Tensor:
    """Sign election and disjoint mean over already-sparsified deltas (torch eager, fp32)."""
    w = torch.tensor(weights, dtype=torch.float32)[:, None]
    stacked = torch.stack(deltas) * w
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    mask = torch.sign(stacked) == sign
    mixed = (stacked * mask).sum(0)
    if normalize:
        div = (w * mask).sum(0)
        mixed = mixed / torch.where(div == 0, 1.0, div)
    return (base.float() + mixed).to(torch.bfloat16)


def torch_ties(base, xs):
    deltas = [topk_trim(x.float() - base.float(), DENSITY) for x in xs]
    return consensus_merge(base, deltas, WEIGHTS, normalize=True)


def test_ties_torch_topk(benchmark, models):
    base, xs = models
    benchmark.pedantic(torch_ties, args=(base, xs), rounds=1, iterations=1)


def test_ties_native(benchmark, models):
    base, xs = models
    benchmark.pedantic(ties_merge, args=(base, xs, WEIGHTS), kwargs=dict(densities=[DENSITY] * K, backend="native"),
                       rounds=3, iterations=1)


@pytest.fixture(scope="module")
def fine_tunes():
    """3 fine-tunes as bench/checkpoints.py makes them: weights scaled 1/sqrt(fan_in) (rows of
    2048), task vectors a hundredth of that."""
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(N, generator=gen) / 2048 ** 0.5).to(torch.bfloat16)
    return base, [(base.float() + torch.randn(N, generator=gen) * 0.01 / 2048 ** 0.5).to(torch.bfloat16) for _ in range(3)]


def test_outlier_band_selection_native(benchmark, fine_tunes):
    """breadcrumbs' two thresholds per model (density 0.9, gamma 0.01, as bench.e2e's config):
    the top-1% cut of such task vectors lands in coarse buckets the one-pass selection has no
    histogram for."""
    from fastmerge.ops.threshold import magnitude_thresholds
    from fastmerge.ops.ties import outlier_ranks

    base, xs = fine_tunes
    ks = outlier_ranks(base.numel(), 0.9, 0.01)
    benchmark.pedantic(lambda: [magnitude_thresholds(x, ks, base=base, backend="native") for x in xs],
                       rounds=5, iterations=1)
