"""apply_mask / pack_mask / unpack_mask / semi_structured_mask against their references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmerge.errors import KernelError
from fastmerge.ops import apply_mask, pack_mask, semi_structured_mask, unpack_mask
from fastmerge.ops.mask import apply_mask_reference, pack_mask_reference, unpack_mask_reference

from op_support import BIG_SIZE


def _x_and_mask(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype), torch.rand(shape, generator=gen) < 0.4


@pytest.mark.parametrize("packed", (False, True), ids=("dense", "packed"))
def test_apply_mask_matches_reference(backend, device, dtype, size, packed, gen, assert_same_bytes):
    x, keep = _x_and_mask((size,), dtype, gen)
    mask = pack_mask(keep) if packed else keep
    for scale in (1.0, 2.5, 1 / 3):
        expected = apply_mask_reference(x, keep, scale)
        assert_same_bytes(apply_mask(x.to(device), mask.to(device), scale, backend=backend), expected)
    assert (expected[~keep] == 0).all() and not torch.signbit(expected[~keep].float()).any()


def test_apply_mask_big_native(gen, assert_same_bytes):
    x, keep = _x_and_mask((BIG_SIZE,), torch.bfloat16, gen)
    expected = apply_mask_reference(x, keep, 1.7)
    assert_same_bytes(apply_mask(x, pack_mask(keep), 1.7, backend="native"), expected)
    assert_same_bytes(apply_mask(x, keep, 1.7, backend="native"), expected)


def test_zero_dim_non_contiguous_inplace_and_out(backend, device, gen, assert_same_bytes):
    scalar = torch.tensor(3.0, dtype=torch.bfloat16)
    for keep in (torch.tensor(True), torch.tensor(False)):
        assert_same_bytes(apply_mask(scalar.to(device), keep.to(device), 2.0, backend=backend), apply_mask_reference(scalar, keep, 2.0))
    x, keep = _x_and_mask((40, 24), torch.float16, gen)
    xt, keep_t = x.t(), keep.t()
    assert_same_bytes(apply_mask(xt.to(device), keep_t.to(device), backend=backend), apply_mask_reference(xt, keep_t))
    y = x.clone().to(device)
    result = apply_mask(y, pack_mask(keep).to(device), 0.5, inplace=True, backend=backend)
    assert result.data_ptr() == y.data_ptr()
    assert_same_bytes(y, apply_mask_reference(x, keep, 0.5))
    buffer = torch.zeros(2000, dtype=torch.float16, device=device)
    apply_mask(x.to(device), keep.to(device), out=buffer[10:970].view(40, 24), backend=backend)
    assert_same_bytes(buffer[10:970].view(40, 24), apply_mask_reference(x, keep))


def test_pack_layout_is_little_endian_bit_order(gen):
    keep = torch.rand(5, 13, generator=gen) < 0.5  # 65 elements: the last byte holds one bit
    expected = torch.from_numpy(np.packbits(keep.numpy().reshape(-1), bitorder="little"))
    for name in ("reference", "native"):
        packed = pack_mask(keep, backend=name)
        assert torch.equal(packed, expected) and packed.shape == (9,)
        assert torch.equal(unpack_mask(packed, keep.shape, backend=name), keep)
    assert pack_mask(torch.tensor([True, False, False, True])).tolist() == [0b1001]


@pytest.mark.parametrize("n", (0, 1, 7, 8, 9, 4097, BIG_SIZE))
def test_pack_unpack_native_matches_reference(n, gen):
    keep = torch.rand(n, generator=gen) < 0.5
    packed = pack_mask(keep, backend="native")
    assert torch.equal(packed, pack_mask_reference(keep))
    assert torch.equal(unpack_mask(packed, (n,), backend="native"), unpack_mask_reference(packed, (n,)))


def test_padding_bits_are_ignored_when_reading():
    packed = torch.tensor([0b11111101], dtype=torch.uint8)  # only 3 real elements
    for name in ("reference", "native"):
        assert unpack_mask(packed, (3,), backend=name).tolist() == [True, False, True]
    assert apply_mask(torch.ones(3), packed, backend="native").tolist() == [1.0, 0.0, 1.0]


def test_semi_structured_mask_keeps_two_largest_ties_to_lower_index():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 5.0, 5.0, 5.0, 0.0], [-1.0, -2.0, -3.0, -4.0, 0.0, 0.0, 0.0, 0.0]])
    expected = [[True, False, True, False, True, True, False, False], [True, True, False, False, True, True, False, False]]
    assert semi_structured_mask(scores).tolist() == expected


def test_two_of_four_masks_are_validated(backend, device, gen, assert_same_bytes):
    x = torch.randn(6, 16, generator=gen).to(torch.bfloat16)
    keep = semi_structured_mask(torch.randn(6, 16, generator=gen))
    out = apply_mask(x.to(device), pack_mask(keep).to(device), semi_structured=True, backend=backend)
    assert_same_bytes(out, apply_mask_reference(x, keep))
    keep[2, 5] = ~keep[2, 5]
    with pytest.raises(KernelError, match=r"group 9 \(flat elements 36..39\) keeps [13] of 4"):
        apply_mask(x, pack_mask(keep), semi_structured=True, backend=backend)
    with pytest.raises(KernelError, match="multiple of 4"):
        apply_mask(torch.zeros(3, 6), torch.ones(3, 6, dtype=torch.bool), semi_structured=True)
    with pytest.raises(KernelError, match="multiple of 4"):
        semi_structured_mask(torch.zeros(5))


def test_bad_masks_raise_kernel_errors_naming_shapes():
    x = torch.zeros(3, 5)
    with pytest.raises(KernelError, match=r"dense mask has shape \(5, 3\) but x has shape \(3, 5\)"):
        apply_mask(x, torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(KernelError, match=r"shape \(3,\); for x of shape \(3, 5\) \(15 elements\) it must be uint8 of shape \(2,\)"):
        apply_mask(x, torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(KernelError, match="torch.bool .dense. or torch.uint8"):
        apply_mask(x, torch.zeros(3, 5, dtype=torch.int32))
    with pytest.raises(KernelError, match="out must be"):
        apply_mask(x, torch.ones(3, 5, dtype=torch.bool), out=torch.zeros(3, 5, dtype=torch.float16))
    with pytest.raises(KernelError, match="pack_mask expects a torch.bool"):
        pack_mask(torch.zeros(3))
