"""DARE randomness: Philox matches the published known answer and Triton's tl.rand bit for bit,
native / Triton / reference draw the same masks at any thread count, and rescale is L1 matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmerge.errors import KernelError
from fastmerge.ops.dare import dare_mask, dare_merge
from fastmerge.ops.random import derive_key, philox_uint32, philox_uniform, uniform_draws

from op_support import ACCELERATED, BIG_SIZE, native_threads

KEYS = [0, 12345, (1 << 63) + 77, (1 << 64) - 1]


def test_philox_known_answer():
    # Random123's published philox4x32-10 answer for counter 0, key 0 (first word).
    assert philox_uint32(0, 0, 1)[0] == 0x6627E8D5


def test_uniform_is_in_unit_interval():
    u = philox_uniform(99, 0, 100_000)
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.01


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("offset", [0, 5, (1 << 32) - 3, (1 << 32) - 40])
def test_backends_draw_identical_bits(backend, device, key, offset):
    n = 4097
    expected = uniform_draws(key, n, offset=offset, backend="reference")
    actual = uniform_draws(key, n, offset=offset, device=device, backend=backend)
    assert torch.equal(actual.cpu().view(torch.int32), expected.view(torch.int32))


@pytest.mark.skipif("native" not in ACCELERATED, reason="native extension not built")
def test_native_draws_do_not_depend_on_thread_count():
    from fastmerge import _native

    draws = []
    for n_threads in (1, max(_native.max_threads(), 3)):
        with native_threads(n_threads):
            draws.append(uniform_draws(7, BIG_SIZE, backend="native"))
    assert torch.equal(draws[0].view(torch.int32), draws[1].view(torch.int32))
    assert torch.equal(draws[0][-100:], torch.from_numpy(philox_uniform(7, BIG_SIZE - 100, 100)))


def test_derive_key_is_stable_and_separates_streams():
    key = derive_key(0, "model.layers.0.mlp.up_proj.weight", 1)
    assert key == 12830244948995187251  # fixed forever: changing it changes every DARE merge
    others = {derive_key(1, "model.layers.0.mlp.up_proj.weight", 1),
              derive_key(0, "model.layers.1.mlp.up_proj.weight", 1),
              derive_key(0, "model.layers.0.mlp.up_proj.weight", 0)}
    assert key not in others and len(others) == 3
    with pytest.raises(KernelError, match="seed"):
        derive_key(-1, "x", 0)


def test_mask_matches_merge_and_density(backend, device):
    mask = dare_mask((64, 65), 0.3, seed=11, tensor_name="w", model_index=1, device=device, backend=backend)
    assert mask.shape == (64, 65) and abs(mask.float().mean().item() - 0.3) < 0.03
    base = torch.zeros(64, 65, device=device)
    x = torch.ones(64, 65, device=device)
    # Model 1's draws: put a dummy model 0 with weight 0 in front.
    out = dare_merge(base, [x, x], [0.0, 1.0], [0.5, 0.3], seed=11, tensor_name="w", rescale=False, backend=backend)
    assert torch.equal((out != 0).cpu(), mask.cpu())


@pytest.mark.parametrize("mode", ["l1", "inverse_density"])
def test_rescale(mode, gen):
    base = torch.randn(50_000, generator=gen)
    x = base + torch.randn(50_000, generator=gen)
    out = dare_merge(base, [x], [1.0], [0.25], seed=5, tensor_name="t", rescale_mode=mode)
    d = (x - base).double()
    kept = dare_mask((50_000,), 0.25, seed=5, tensor_name="t", model_index=0)
    scale = d.abs().sum() / d[kept].abs().sum() if mode == "l1" else torch.tensor(4.0, dtype=torch.float64)
    torch.testing.assert_close((out - base).double(), torch.where(kept, d * scale, 0.0), rtol=1e-5, atol=1e-5)
    if mode == "l1":  # L1 matching: the kept task vector has the full vector's L1 norm
        assert abs((out - base).double().abs().sum() / d.abs().sum() - 1) < 1e-5


def test_bad_density_is_named():
    with pytest.raises(KernelError, match="embed.*model 2"):
        dare_mask((4,), 1.5, seed=0, tensor_name="embed", model_index=2)


@pytest.mark.skipif("native" not in ACCELERATED, reason="native extension not built")
@pytest.mark.parametrize("offset", [0, 7, (1 << 32) - 40, (1 << 32) - 3, 5 << 32])
@pytest.mark.parametrize("n, spacing", [(0, 1), (1, 1), (31, 1), (33, 3), (512, 1), (513, 2), (5000, 4)])
def test_native_draws_at_chosen_elements_match_reference(offset, n, spacing):
    """The draws DARE's L1 pass makes at a task vector's nonzeros only: any offset (steps whose
    counters cross a multiple of 2^32 included), partial vector steps, dense and sparse picks."""
    from fastmerge import _native

    picks = np.random.default_rng(n).choice(spacing * n + 1, size=n, replace=False)
    idx = np.sort(picks).astype(np.uint32)
    out = np.full(n, -1.0, dtype=np.float32)
    _native.philox_fill_at(out.ctypes.data, 12345, offset, idx.ctypes.data, n)
    every = philox_uniform(12345, offset, spacing * n + 1)
    assert np.array_equal(out.view(np.int32), every[idx].view(np.int32))


@pytest.mark.skipif("native" not in ACCELERATED, reason="native extension not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 17, 513, 65536 + 37])
@pytest.mark.parametrize("unchanged", [0.0, 0.3, 0.97, 1.0])
def test_native_l1_pass_on_sparse_task_vectors(dtype, n, unchanged):
    """The native L1 pass draws only at nonzero deltas (most of an RL fine-tune's weights are
    unchanged). Its sums and keep mask must be what drawing everywhere gives: sums over the
    reference's kept values, and kept & (d != 0) as the mask, with -0, +-inf and NaN deltas."""
    from fastmerge import _native
    from fastmerge.dtypes import native_code
    from fastmerge.ops import ties as T

    gen = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=gen).to(dtype)
    x = (base.float() + torch.randn(n, generator=gen)).to(dtype)
    same = torch.rand(n, generator=gen) < unchanged
    x[same] = base[same]
    if n > 100:
        base[:20], x[:10], x[10:20] = 0.0, -0.0, 0.0  # d = -0 and +0
        x[50], x[60], x[70:90] = float("inf"), float("-inf"), float("nan")
    sel = T.Selector(T.RANDOM, key=derive_key(3, "sparse", 1), density=0.4)
    bits = torch.full(((n + 7) // 8,), 0xA5, dtype=torch.uint8)
    sums = _native.kept_l1(x.data_ptr(), native_code(dtype), base.data_ptr(), native_code(dtype), n, sel.mode,
                           0, 0, 0, 0, sel.key, sel.density, 0, bits.data_ptr())
    mask = torch.from_numpy(np.unpackbits(bits.numpy(), bitorder="little")[:n].astype(bool))
    d = x.float() - base.float()
    kept = T.reference_keep(d, sel)
    expected = (T.lane_l1(d), T.lane_l1(torch.where(kept, d, 0.0)))
    assert np.array_equal(np.array(sums), np.array(expected), equal_nan=True)
    assert torch.equal(mask, kept & (d != 0))
    assert torch.equal(T.reference_keep(d, T.Selector(T.MASK_BITS, keep=bits)), mask)  # the oracle reads the bits alike
