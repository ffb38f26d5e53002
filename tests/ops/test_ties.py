"""Fused TIES-family merge: every backend gives the reference's bytes, and the reference agrees
with the METHODS.md formula written independently here (fp64, sort-based trimming)."""

from __future__ import annotations

import pytest
import torch

from fastmerge.errors import KernelError
from fastmerge.ops import MagnitudeHistogram, ties_merge
from fastmerge.ops._fma import fma_f32

from conftest import BIG_SIZE

VARIANTS = {
    "ties": dict(sparsify="magnitude", consensus=True, normalize=True),
    "task_arithmetic": dict(sparsify="magnitude", consensus=False, normalize=False),
    "dare_ties": dict(sparsify="random", consensus=True, normalize=False, rescale=True),
    "dare_linear_inv": dict(sparsify="random", consensus=False, rescale=True, rescale_mode="inverse_density"),
    "breadcrumbs_ties": dict(sparsify="magnitude_outliers", consensus=True, normalize=False, gamma=0.05),
}


def _models(k, n, dtype, gen, device="cpu"):
    base = torch.randn(n, generator=gen).to(dtype)
    xs = [(base.float() + torch.randn(n, generator=gen) * 0.01 * (i + 1)).to(dtype) for i in range(k)]
    weights = (torch.rand(k, generator=gen, dtype=torch.float64) * 1.5 - 0.3).tolist()
    densities = (torch.rand(k, generator=gen, dtype=torch.float64) * 0.8 + 0.1).tolist()
    return base.to(device), [x.to(device) for x in xs], weights, densities


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_backends_match_reference(backend, device, dtype, size, variant, k, gen, assert_same_bytes):
    base, xs, weights, densities = _models(k, size, dtype, gen, device)
    kw = dict(weights=weights, densities=densities, lam=0.9, seed=7, tensor_name="model.layers.1.w", **VARIANTS[variant])
    expected = ties_merge(base.cpu(), [x.cpu() for x in xs], backend="reference", **kw)
    assert_same_bytes(ties_merge(base, xs, backend=backend, **kw), expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_big_tensor_native_matches_reference(variant, assert_same_bytes):
    from fastmerge import _native

    base, xs, weights, densities = _models(2, BIG_SIZE, torch.bfloat16, torch.Generator().manual_seed(5))
    kw = dict(weights=weights, densities=densities, seed=3, tensor_name="embed", **VARIANTS[variant])
    expected = ties_merge(base, xs, backend="reference", **kw)
    threads = _native.max_threads()
    try:
        for n_threads in {1, max(threads, 3)}:  # results must not depend on the thread count
            _native.set_num_threads(n_threads)
            assert_same_bytes(ties_merge(base, xs, backend="native", **kw), expected)
    finally:
        _native.set_num_threads(threads)


def _formula(base, xs, weights, keeps, consensus, normalize, lam):
    """METHODS.md in fp64 with explicit keep masks."""
    b = base.double()
    W = torch.stack([w * torch.where(keep, x.float().double() - b, 0.0) for x, w, keep in zip(xs, weights, keeps)])
    w = torch.tensor(weights, dtype=torch.float64)[:, None].expand_as(W)
    if consensus:
        sign = torch.where(W.sum(0) >= 0, 1.0, -1.0)
        mask = torch.sign(W) == sign
    else:
        mask = torch.ones_like(W, dtype=torch.bool)
    mixed = (W * mask).sum(0)
    div = (w * mask).sum(0)
    if normalize:
        mixed = mixed / torch.where(div == 0, 1.0, div)
    return b + lam * mixed


def _top(d, k):
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[torch.sort(d.abs(), descending=True, stable=True).indices[:k]] = True
    return keep


@pytest.mark.parametrize("consensus,normalize", [(True, True), (True, False), (False, False), (False, True)])
def test_reference_matches_independent_formula(consensus, normalize, gen):
    base, xs, weights, densities = _models(4, 4097, torch.float32, gen)
    weights[1] = -weights[1]  # a negative weight flips its model's sign vote
    out = ties_merge(base, xs, weights, densities=densities, consensus=consensus, normalize=normalize, lam=0.8)
    keeps = [_top(x - base, int(p * 4097)) for x, p in zip(xs, densities)]
    expected = _formula(base, xs, weights, keeps, consensus, normalize, 0.8)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)


def test_breadcrumbs_drops_outliers_and_keeps_density(gen):
    base, xs, _, _ = _models(1, 4000, torch.float32, gen)
    out = ties_merge(base, xs, [1.0], densities=[0.5], sparsify="magnitude_outliers", gamma=0.1,
                     consensus=False, normalize=False)
    d = xs[0] - base
    order = torch.sort(d.abs(), descending=True, stable=True).indices
    keep = torch.zeros(4000, dtype=torch.bool)
    keep[order[400:2400]] = True
    assert torch.equal(out, base + torch.where(keep, d, 0.0))


def test_model_wide_thresholds(backend, gen, assert_same_bytes):
    base, xs, weights, _ = _models(2, 4097, torch.bfloat16, gen)
    thresholds = []
    for x in xs:
        hist = MagnitudeHistogram(0.25)
        hist.add(x, base)
        hist.refine()
        hist.add(x, base)
        thresholds.append(hist.tensor_threshold(0))
    expected = ties_merge(base, xs, weights, thresholds=thresholds, backend="reference")
    assert_same_bytes(ties_merge(base, xs, weights, thresholds=thresholds, backend=backend), expected)
    assert_same_bytes(expected, ties_merge(base, xs, weights, densities=[0.25, 0.25], backend="reference"))


def test_della_keeps_about_density_and_is_reference_only(gen):
    base, xs, weights, _ = _models(2, 64 * 200, torch.float32, gen)
    base, xs = base.reshape(64, 200), [x.reshape(64, 200) for x in xs]
    out = ties_merge(base, xs[:1], [1.0], densities=[0.4], sparsify="della", consensus=False,
                     normalize=False, backend="reference")
    kept = ((out - base) != 0).float().mean().item()
    assert abs(kept - 0.4) < 0.02
    with pytest.raises(KernelError, match="no 'native' backend"):
        ties_merge(base, xs, weights, densities=[0.4, 0.4], sparsify="della", backend="native")
    with pytest.raises(KernelError, match="della needs"):
        ties_merge(base, xs, weights, densities=[0.1, 0.4], sparsify="della", backend="reference")


def test_bad_arguments_name_the_problem(gen):
    base, xs, weights, _ = _models(2, 10, torch.float32, gen)
    with pytest.raises(KernelError, match="base"):
        ties_merge(None, xs, weights)
    with pytest.raises(KernelError, match="2 inputs but 1 weights"):
        ties_merge(base, xs, [1.0])
    with pytest.raises(KernelError, match="sparsify"):
        ties_merge(base, xs, weights, sparsify="topk")
    with pytest.raises(KernelError, match="input 1 has shape"):
        ties_merge(base, [xs[0], xs[1][:5]], weights)


def test_fma_f32_rounds_once():
    # 1 + 2**-24 + tiny: a midpoint after the fp64 sum, but the exact value is above it.
    a = torch.tensor([1 + 2**-23], dtype=torch.float32)
    b = torch.tensor([2**-24 + 2**-47], dtype=torch.float32)
    c = torch.tensor([-(2**-47)], dtype=torch.float32)
    exact_above_midpoint = fma_f32(a, b, torch.tensor([1.0]) + c)
    assert exact_above_midpoint.item() == 1 + 2**-23
