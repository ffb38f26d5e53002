"""The Triton L1 lane sums (DARE rescale) equal the native kernel's and the numpy reference's
bit for bit, for every sparsifier mode, on tensors of one and of several lane rows."""

from __future__ import annotations

import pytest
import torch

from fastmerge.ops import ties as T
from fastmerge.ops.threshold import magnitude_threshold, tie_cutoff

from op_support import ACCELERATED, TRITON_UNTESTABLE

pytestmark = pytest.mark.skipif("triton" not in ACCELERATED, reason=TRITON_UNTESTABLE or "triton not usable here")

# One partial row, exactly one row, several rows with a ragged end.
SIZES = (5, T.L1_LANES, 3 * T.L1_LANES + 11)


def _selector(mode: str, x: torch.Tensor, base: torch.Tensor) -> T.Selector:
    n = x.numel()
    if mode == "keep_all":
        return T.Selector()
    if mode == "magnitude":
        t = magnitude_threshold(x, n // 3, base=base)
        return T.Selector(T.MAGNITUDE, t.bits, tie_cutoff(x, t, base=base))
    if mode == "outliers":
        hi, lo = magnitude_threshold(x, n // 50, base=base), magnitude_threshold(x, n // 2, base=base)
        return T.Selector(T.OUTLIERS, hi.bits, tie_cutoff(x, hi, base=base), lo.bits, tie_cutoff(x, lo, base=base))
    if mode == "random":
        return T.Selector(T.RANDOM, key=(1 << 63) + 12345, density=0.3)
    keep = torch.rand(n, generator=torch.Generator().manual_seed(9)) < 0.6
    return T.Selector(T.MASKED, keep=keep)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", ["keep_all", "magnitude", "outliers", "random", "masked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_lane_sums_match_native_and_reference(n, mode, dtype):
    from fastmerge.ops.triton_kernels.lane_l1 import kept_l1_lanes

    gen = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=gen).to(dtype)
    # Widely spread magnitudes, so the fp64 sums depend on the order they are added in.
    x = (base.float() + torch.randn(n, generator=gen) * torch.logspace(-6, 2, n)[torch.randperm(n, generator=gen)])
    x = x.to(dtype)
    sel = _selector(mode, x, base)
    triton_sums = tuple(map(T._in_lane_order, kept_l1_lanes(x, base, sel, T.L1_LANES)))
    d = x.float() - base.float()
    reference = (T.lane_l1(d), T.lane_l1(torch.where(T.reference_keep(d, sel), d, 0.0)))
    assert triton_sums == reference
    assert 0 < triton_sums[1] < triton_sums[0] or mode == "keep_all"
    if "native" in ACCELERATED:
        from fastmerge import _native
        from fastmerge.dtypes import native_code

        native = _native.kept_l1(x.data_ptr(), native_code(x.dtype), base.data_ptr(), native_code(base.dtype), n,
                                 sel.mode, sel.t_hi, sel.cut_hi, sel.t_lo, sel.cut_lo, sel.key, sel.density,
                                 T._mask_ptr(sel))
        assert triton_sums == tuple(native)


def test_lane_order_is_not_a_plain_sum():
    """Guards the test above: with these magnitudes another summation order gives other bits."""
    n = 3 * T.L1_LANES + 11
    gen = torch.Generator().manual_seed(n)
    d = (torch.randn(n, generator=gen) * torch.logspace(-6, 2, n)[torch.randperm(n, generator=gen)]).double()
    assert T.lane_l1(d) != float(d.abs().sum())
