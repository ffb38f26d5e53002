"""Histogram magnitude threshold vs a sort-based oracle written here (keep exactly k: ties at the
threshold by ascending flat index; model-wide: by tensor order, then flat index)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fastmerge.errors import KernelError
from fastmerge.ops import threshold as threshold_module
from fastmerge.ops.threshold import (BACKENDS, MagnitudeHistogram, density_to_k, keep_mask, magnitude_threshold,
                                    magnitude_thresholds, tie_cutoff)

from op_support import ACCELERATED, BIG_SIZE

THRESHOLD_BACKENDS = ["reference", *(b for b in ACCELERATED if b in BACKENDS)]


def oracle_keep(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of |x| by a stable descending sort: equal magnitudes stay in flat-index order."""
    a = x.reshape(-1).float().abs()
    keep = torch.zeros(a.numel(), dtype=torch.bool)
    keep[torch.sort(a, descending=True, stable=True).indices[: max(k, 0)]] = True
    return keep


@pytest.fixture(params=THRESHOLD_BACKENDS)
def sel_backend(request) -> str:
    return request.param


@pytest.mark.parametrize("n", [0, 1, 7, 4097])
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.2, 0.5, 1.0, 1.5])
def test_threshold_matches_sort_oracle(sel_backend, dtype, n, fraction, gen):
    x = torch.randn(n, generator=gen).to(dtype)
    k = int(fraction * n) if fraction <= 1 else n + 5
    t = magnitude_threshold(x, k, backend=sel_backend)
    assert torch.equal(keep_mask(x, t), oracle_keep(x, k))


def test_many_ties_keep_exactly_k(sel_backend, dtype, gen):
    x = torch.randint(-3, 4, (4097,), generator=gen).to(dtype)  # magnitudes 0..3 only
    for k in (1, 100, 1500, 3000, 4097):
        t = magnitude_threshold(x, k, backend=sel_backend)
        mask = keep_mask(x, t)
        assert int(mask.sum()) == k
        assert torch.equal(mask, oracle_keep(x, k))


def test_base_is_subtracted_in_fp32(sel_backend, gen):
    x = torch.randn(4097, generator=gen).to(torch.bfloat16)
    b = torch.randn(4097, generator=gen).to(torch.bfloat16)
    t = magnitude_threshold(x, 900, base=b, backend=sel_backend)
    d = x.float() - b.float()
    assert torch.equal(keep_mask(x, t, base=b), oracle_keep(d, 900))


@pytest.mark.skipif("native" not in THRESHOLD_BACKENDS, reason="native extension not built")
def test_big_tensor_native():
    x = torch.randn(BIG_SIZE, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    k = density_to_k(0.2, x.numel())
    t = magnitude_threshold(x, k, backend="native")
    assert t == magnitude_threshold(x, k, backend="reference")
    assert torch.equal(keep_mask(x, t), oracle_keep(x, k))


def test_nan_is_rejected(sel_backend):
    x = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(KernelError, match="layer.3 contains NaN"):
        magnitude_threshold(x, 1, backend=sel_backend, name="layer.3")


def test_infinities_order_highest(sel_backend):
    x = torch.tensor([1.0, float("-inf"), 3.0, float("inf")])
    assert torch.equal(keep_mask(x, magnitude_threshold(x, 2, backend=sel_backend)),
                       torch.tensor([False, True, False, True]))


def test_density_to_k_truncates_like_mergekit():
    assert density_to_k(0.2, 10) == 2 and density_to_k(0.29, 10) == 2 and density_to_k(1.0, 7) == 7
    with pytest.raises(KernelError):
        density_to_k(1.5, 10)


def test_model_wide_histogram_matches_concatenated_oracle(sel_backend, gen):
    # Integer-valued deltas make many ties at the threshold, spread over several tensors.
    bases = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in (7, 4097, 300, 1)]
    xs = [(b.float() + torch.randint(-4, 5, b.shape, generator=gen)).to(torch.bfloat16) for b in bases]
    for density in (0.0, 0.05, 0.3, 1.0):
        hist = MagnitudeHistogram(density, backend=sel_backend)
        for x, b in zip(xs, bases):
            hist.add(x, b)
        hist.refine()
        for x, b in zip(xs, bases):
            hist.add(x, b)
        masks = [keep_mask(x, hist.tensor_threshold(i), base=b) for i, (x, b) in enumerate(zip(xs, bases))]
        deltas = torch.cat([x.float() - b.float() for x, b in zip(xs, bases)])
        k = int(density * deltas.numel())
        assert torch.equal(torch.cat(masks), oracle_keep(deltas, k))


def test_model_wide_histogram_finds_several_ranks_in_one_coarse_pass(sel_backend, gen):
    """`ranks` (breadcrumbs' dropped outliers and kept band) gives each k its own exact threshold."""
    bases = [torch.randn(s, generator=gen) for s in (4097, 300)]
    xs = [(b + torch.randint(-40, 41, b.shape, generator=gen) / 8).to(torch.bfloat16) for b in bases]
    hist = MagnitudeHistogram(0.5, backend=sel_backend, ranks=lambda total: (3, total // 2, total + 9))
    for phase in (1, 2):
        for x, b in zip(xs, bases):
            hist.add(x, b)
        if phase == 1:
            hist.refine()
    deltas = torch.cat([x.float() - b.float() for x, b in zip(xs, bases)])
    for which, k in enumerate((3, deltas.numel() // 2, deltas.numel())):
        masks = [keep_mask(x, hist.tensor_threshold(i, which), base=b) for i, (x, b) in enumerate(zip(xs, bases))]
        assert torch.equal(torch.cat(masks), oracle_keep(deltas, k))


def test_model_wide_histogram_needs_both_phases():
    hist = MagnitudeHistogram(0.5)
    hist.add(torch.ones(4))
    with pytest.raises(KernelError, match="refine"):
        hist.threshold()
    hist.refine()
    with pytest.raises(KernelError, match="same tensors"):
        hist.add(torch.ones(5))


@pytest.mark.parametrize("hist_backend", [b for b in THRESHOLD_BACKENDS if b != "native"])
def test_several_ks_share_the_histogram_passes(hist_backend, monkeypatch):
    """The histogram backends give each k its own threshold from one coarse pass plus one fine
    pass per distinct bucket (ks in one bucket share it)."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(6000, generator=gen) * 0.01).to(torch.bfloat16)  # bf16: many ties
    base = torch.randn(6000, generator=gen).to(torch.bfloat16) * 0
    ks = [60, 61, 3000, 0, 7000]
    expected = [magnitude_threshold(x, k, base=base, backend=hist_backend) for k in ks]
    buckets = {t.bits >> 16 for t in expected if t.ties_to_keep or t.value != float("inf")}
    passes = []
    real = threshold_module.accumulate_histogram
    monkeypatch.setattr(threshold_module, "accumulate_histogram",
                        lambda *a, **kw: (passes.append(a[2]), real(*a, **kw))[1])
    assert magnitude_thresholds(x, ks, base=base, backend=hist_backend) == expected
    assert passes == [1] + [2] * len(buckets)
    for k, t in zip(ks, expected):
        assert torch.equal(keep_mask(x.float() - base.float(), t), oracle_keep(x.float(), k))


def test_thresholds_carry_their_tie_cutoff(sel_backend, gen):
    x = torch.randint(-3, 4, (4097,), generator=gen).to(torch.bfloat16)
    for t in magnitude_thresholds(x, [0, 1, 1500, 4097], backend=sel_backend):
        t_alone = replace(t, cutoff=None)
        assert t.cutoff == tie_cutoff(x, t_alone, backend="reference")


# The native one-pass selection, forced down each of its paths; every path must give the
# reference's thresholds (values, ties and cut-offs) on a tensor big enough for the thread team.
NATIVE_PATHS = {
    "sampled window": 65536,
    "whole tensor as sample": 1 << 30,
    "one-element sample, mostly second pass": 1,
}


@pytest.mark.skipif("native" not in THRESHOLD_BACKENDS, reason="native extension not built")
@pytest.mark.parametrize("path", list(NATIVE_PATHS))
@pytest.mark.parametrize("data", ["continuous", "few magnitudes", "fine-tune"])
def test_native_one_pass_selection_matches_reference(monkeypatch, path, data):
    """"fine-tune" is a bf16 task vector a hundredth of the weights (the benchmark's): its top 1%
    spreads over more coarse buckets than get histograms, where the k-th largest is pinned by
    its bucket's count of values with zero low bits."""
    from fastmerge import _native

    monkeypatch.setattr(threshold_module, "SELECT_SAMPLE", NATIVE_PATHS[path])
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(BIG_SIZE, generator=gen).to(torch.bfloat16)
    if data == "fine-tune":
        x = (base.float() + torch.randn(BIG_SIZE, generator=gen) * 0.01).to(torch.bfloat16)
    else:
        step = torch.randn(BIG_SIZE, generator=gen) * 0.05 if data == "continuous" else \
            torch.randint(-3, 4, (BIG_SIZE,), generator=gen) * 2.0 ** -8
        x = (base.float() * (1 + step)).to(torch.bfloat16)
    ks = [1, 1000, BIG_SIZE // 100, BIG_SIZE // 5, BIG_SIZE // 2, BIG_SIZE]
    expected = magnitude_thresholds(x, ks, base=base, backend="reference")
    threads = _native.max_threads()
    try:
        for n_threads in (1, max(threads, 3)):
            _native.set_num_threads(n_threads)
            assert magnitude_thresholds(x, ks, base=base, backend="native") == expected
    finally:
        _native.set_num_threads(threads)


@pytest.mark.skipif("native" not in THRESHOLD_BACKENDS, reason="native extension not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_selection_in_a_bucket_without_a_histogram(monkeypatch, dtype):
    """A 4096-element sample widens the windows over more occupied buckets than get histograms,
    so the k-th largest lands in one without: bf16 values (low 16 bits zero) are pinned by the
    bucket's counts; fp32 values (low bits set) take a fine pass over that bucket alone. Both
    give the reference's thresholds and tie cut-offs."""
    from fastmerge import _native

    monkeypatch.setattr(threshold_module, "SELECT_SAMPLE", 4096)
    x = torch.randn(BIG_SIZE, generator=torch.Generator().manual_seed(5)).to(dtype)
    ks = [BIG_SIZE // 100, BIG_SIZE // 7]
    expected = magnitude_thresholds(x, ks, backend="reference")
    threads = _native.max_threads()
    try:
        for n_threads in (1, max(threads, 3)):
            _native.set_num_threads(n_threads)
            assert magnitude_thresholds(x, ks, backend="native") == expected
    finally:
        _native.set_num_threads(threads)
