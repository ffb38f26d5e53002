"""Fused TIES-family merge: every backend gives the reference's bytes, and the reference agrees
with the METHODS.md formula written independently here (fp64, sort-based trimming)."""

from __future__ import annotations

import pytest
import torch

from fastmerge.errors import KernelError
from fastmerge.ops import MagnitudeHistogram, ties_merge
from fastmerge.ops._fma import fma_f32

from op_support import ACCELERATED, BIG_SIZE, native_threads

VARIANTS = {
    "ties": dict(sparsify="magnitude", consensus=True, normalize=True),
    "task_arithmetic": dict(sparsify="magnitude", consensus=False, normalize=False),
    "dare_ties": dict(sparsify="random", consensus=True, normalize=False, rescale=True),
    "dare_linear_inv": dict(sparsify="random", consensus=False, rescale=True, rescale_mode="inverse_density"),
    "breadcrumbs_ties": dict(sparsify="magnitude_outliers", consensus=True, normalize=False, gamma=0.05),
}

# The native DELLA kernel's two ways to rank a row (1: scalar passes, 2: 16 elements at a time
# where the build has AVX-512 CD), each checked whichever this CPU would pick (0).
DELLA_RANKINGS = [pytest.param(1, id="scalar-ranking"), pytest.param(2, id="vector-ranking")]


def native_della(x, base, *args, ranking=0, l1=False):
    """The native DELLA mask as a bool per element (MASK_BITS unpacked), its mode, and its sums."""
    from fastmerge.ops.mask import unpack_mask_reference
    from fastmerge.ops.ties import MASK_BITS, _native_della_keep

    sel = _native_della_keep(x, base, *args, ranking, l1=l1)
    keep = unpack_mask_reference(sel.keep, (x.numel(),)) if sel.mode == MASK_BITS else sel.keep
    return keep, sel.mode, sel.l1


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
def test_more_than_64_models(backend, device, variant, gen, assert_same_bytes):
    """mergekit merges any number of models; the native kernel stopped at 64 (a ValueError)."""
    base, xs, weights, densities = _models(70, 1001, torch.bfloat16, gen, device)
    kw = dict(weights=weights, densities=densities, seed=7, tensor_name="w", **VARIANTS[variant])
    expected = ties_merge(base.cpu(), [x.cpu() for x in xs], backend="reference", **kw)
    assert_same_bytes(ties_merge(base, xs, backend=backend, **kw), expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_big_tensor_native_matches_reference(variant, assert_same_bytes):
    from fastmerge import _native

    base, xs, weights, densities = _models(2, BIG_SIZE, torch.bfloat16, torch.Generator().manual_seed(5))
    kw = dict(weights=weights, densities=densities, seed=3, tensor_name="embed", **VARIANTS[variant])
    expected = ties_merge(base, xs, backend="reference", **kw)
    for n_threads in {1, max(_native.max_threads(), 3)}:  # results must not depend on the thread count
        with native_threads(n_threads):
            assert_same_bytes(ties_merge(base, xs, backend="native", **kw), expected)


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


def _della_oracle(d, density, epsilon, key):
    """mergekit's DELLA rank rule written out: rank |d| along dim 1 (0/1-dim tensors are one
    row) by a stable ascending sort, normalise to rank / (len - 1), draw from Philox."""
    from fastmerge.ops.random import philox_uniform

    a = d.float().abs()
    a = a.reshape(1, -1) if a.dim() < 2 else a
    moved = a.movedim(1, -1)
    rank = torch.argsort(torch.argsort(moved, dim=-1, stable=True), dim=-1).movedim(-1, 1)
    p = ((density - epsilon) + 2 * epsilon * rank.double() / (a.shape[1] - 1)).float().reshape(-1)
    return torch.from_numpy(philox_uniform(key, 0, d.numel())) < p


@pytest.mark.parametrize("shape", [(300,), (12, 40), (3, 10, 7), (2, 3, 4, 5)])
def test_della_ranks_along_dim_1_in_every_backend(shape, backend, device, assert_same_bytes, gen):
    from fastmerge.ops.random import derive_key

    base = torch.randn(shape, generator=gen).to(torch.bfloat16)
    xs = [(base.float() + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16) for _ in range(3)]
    kw = dict(densities=[0.5, 0.3, 0.7], epsilon=[0.2, 0.1, 0.25], sparsify="della", consensus=False,
              normalize=False, seed=9, tensor_name="w")
    expected = ties_merge(base, xs, [1.0, 0.0, 0.0], **kw, backend="reference")
    keep = _della_oracle(xs[0].float() - base.float(), 0.5, 0.2, derive_key(9, "w", 0))
    assert torch.equal((expected != base).reshape(-1), keep & (xs[0] != base).reshape(-1))
    out = ties_merge(base.to(device), [x.to(device) for x in xs], [0.6, -0.3, 0.5], **kw | dict(consensus=True),
                     rescale=True, backend=backend)
    assert_same_bytes(out, ties_merge(base, xs, [0.6, -0.3, 0.5], **kw | dict(consensus=True), rescale=True,
                                      backend="reference"))


@pytest.mark.skipif("triton" not in ACCELERATED, reason="triton not usable here")
def test_della_on_a_gpu_ranks_in_torch_and_draws_with_triton(monkeypatch, gen):
    """A GPU merge's DELLA path, on the CPU: the selection backend a GPU without the CUDA build
    gets (reference: torch's sort) and the Triton element pass. Its Philox draws must come from
    the Triton kernel, on the device (numpy's draws on the CPU would take about an hour of a
    7B merge), and give the oracle's bytes."""
    from fastmerge.ops import ties as ties_module

    shape = (12, 40)
    base = torch.randn(shape, generator=gen).to(torch.bfloat16)
    xs = [(base.float() + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16) for _ in range(2)]
    kw = dict(densities=[0.5, 0.3], epsilon=0.1, sparsify="della", rescale=True, seed=3, tensor_name="w")
    expected = ties_merge(base, xs, [0.6, 0.4], **kw, backend="reference")
    draws, draw = [], ties_module.uniform_draws

    def recorded(*args, backend=None, **kwargs):
        draws.append(backend)
        return draw(*args, backend=backend, **kwargs)

    monkeypatch.setattr(ties_module, "threshold_backend", lambda device, run_backend: "reference")
    monkeypatch.setattr(ties_module, "uniform_draws", recorded)
    assert torch.equal(ties_merge(base, xs, [0.6, 0.4], **kw, backend="triton"), expected)
    assert draws == ["triton", "triton"]


def test_della_density_bounds_follow_mergekit(backend, gen):
    base, xs, weights, _ = _models(2, 64 * 20, torch.float32, gen)
    base, xs = base.reshape(64, 20), [x.reshape(64, 20) for x in xs]
    kw = dict(sparsify="della", consensus=False, normalize=False, rescale=True, backend=backend)
    assert torch.equal(ties_merge(base, xs, weights, densities=[0.0, -0.5], **kw), base)  # nothing kept
    whole = ties_merge(base, xs, weights, densities=[1.0, 1.0], **kw)
    assert torch.equal(whole, ties_merge(base, xs, weights, **kw | dict(sparsify="magnitude")))
    with pytest.raises(KernelError, match="della needs"):
        ties_merge(base, xs, weights, densities=[0.1, 0.4], **kw)
    with pytest.raises(KernelError, match="dim 1"):
        ties_merge(base[:, :1], [x[:, :1] for x in xs], weights, densities=[0.4, 0.4], **kw)


def test_breadcrumbs_per_model_gamma_and_mergekit_edge_cases(backend, device, gen, assert_same_bytes):
    """Against mergekit's rule written as a sort: ascending order, keep positions
    [bottom, bottom + target) with bottom = max(0, n - target - int(gamma n))."""
    base, xs, _, _ = _models(3, 1000, torch.float32, gen)
    densities, gammas = [0.5, 0.95, 1.0], [0.1, 0.2, 0.3]
    out = ties_merge(base, xs, [1.0, 0.0, 0.0], densities=densities, gamma=gammas, sparsify="magnitude_outliers",
                     consensus=False, normalize=False)
    d = xs[0] - base
    keep = torch.zeros(1000, dtype=torch.bool)
    keep[torch.sort(d.abs(), stable=True).indices[400:900]] = True
    assert torch.equal(out, base + torch.where(keep, d, 0.0))
    for i, density in ((1, 0.95), (2, 1.0)):  # 950 + 200 > 1000: only 50 outliers go; density 1: none
        one_hot = [float(j == i) for j in range(3)]
        out = ties_merge(base, xs, one_hot, densities=densities, gamma=gammas, sparsify="magnitude_outliers",
                         consensus=False, normalize=False)
        d = xs[i] - base
        keep = torch.zeros(1000, dtype=torch.bool)
        keep[torch.sort(d.abs(), stable=True).indices[: int(density * 1000)]] = True
        assert torch.equal(out, base + torch.where(keep, d, 0.0))
    kw = dict(densities=densities, gamma=gammas, sparsify="magnitude_outliers", lam=0.7)
    assert_same_bytes(ties_merge(base.to(device), [x.to(device) for x in xs], [0.5, -0.2, 0.9], backend=backend, **kw),
                      ties_merge(base, xs, [0.5, -0.2, 0.9], backend="reference", **kw))


def test_rescale_skips_sums_below_1e_7(backend, device):
    """mergekit rescales only when both L1 sums are >= 1e-7: here the whole task vector sums to
    about 4e-8, so the kept values stay as they are; larger deltas are rescaled."""
    base = torch.zeros(4000, device=device)
    for scale, rescaled in ((1e-11, False), (1e-3, True)):
        x = torch.linspace(-1, 1, 4000, device=device) * scale
        out = ties_merge(base, [x], [1.0], densities=[0.5], sparsify="magnitude", consensus=False, normalize=False,
                         rescale=True, backend=backend)
        kept = out != 0
        assert int(kept.sum()) == 2000
        assert torch.equal(out[kept] == x[kept], torch.full_like(out[kept], not rescaled, dtype=torch.bool))


def test_plain_divisor_below_1e_8_is_one(backend, device):
    """Without consensus mergekit divides by sum w, replaced by 1 when |sum w| < 1e-8."""
    base = torch.zeros(64, device=device)
    x = torch.ones(64, device=device)
    kw = dict(consensus=False, normalize=True, backend=backend)
    assert torch.equal(ties_merge(base, [x, x], [4e-9, 5e-9], **kw), torch.full_like(x, 9e-9))
    assert torch.equal(ties_merge(base, [x, x], [4e-8, 5e-8], **kw), torch.ones_like(x))


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


@pytest.mark.parametrize("consensus", [True, False])
def test_dare_rescale_mask_replay_keeps_zero_deltas_exact(backend, device, consensus, assert_same_bytes):
    """The native L1 pass hands its selection to the merge as a mask (nonzero kept values): task
    vectors full of exact zeros, -0 (x = -0, b = +0) and an inf must still merge byte for byte."""
    gen = torch.Generator().manual_seed(11)
    n = 5000
    base = torch.randn(n, generator=gen)
    base[:1000] = 0.0
    xs = []
    for i in range(3):
        x = base + torch.randn(n, generator=gen) * 0.01
        x[i * 700: i * 700 + 1500] = base[i * 700: i * 700 + 1500]  # d == 0 exactly
        x[:300] = -0.0  # d = -0 - (+0) = -0
        xs.append(x)
    xs[1][4321] = float("inf")
    kw = dict(weights=[0.6, -0.4, 0.8], densities=[0.3, 0.5, 0.7], sparsify="random", consensus=consensus,
              normalize=False, rescale=True, seed=5, tensor_name="zeros")
    expected = ties_merge(base, xs, backend="reference", **kw)
    assert_same_bytes(ties_merge(base.to(device), [x.to(device) for x in xs], backend=backend, **kw), expected)


@pytest.mark.skipif("native" not in ACCELERATED, reason="native extension not built")
@pytest.mark.parametrize("ranking", DELLA_RANKINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, spread, specials", [((3, 5000), 20, True), ((5, 2048), 3, False),
                                                      ((4, 700, 3), 20, True), ((9, 2), 20, True)])
def test_native_della_mask_matches_reference_on_long_rows_with_ties(shape, spread, specials, dtype, ranking):
    """The native mask against the torch sort, on rows longer than a kernel chunk with magnitudes
    over 2 * spread exponents and exact ties (bf16 steps, zeros). The native kernel ranks a row
    by counting, or by sorting where its magnitudes span many more bins than it has elements
    (the 3-d and 2-wide rows, and rows with inf: `specials` adds +-inf and NaN, which ranks
    above inf). bf16 inputs give |d| that are mostly exact bf16 values (ranked by position in
    their bin); fp32 inputs give |d| with low bits set (sorted within their bin)."""
    from fastmerge.ops.ties import _reference_della_keep, della_fibres

    gen = torch.Generator().manual_seed(21)
    n = int(torch.tensor(shape).prod())
    d = (torch.randn(n, generator=gen) * torch.exp2(torch.randint(-spread, spread, (n,), generator=gen).float()))
    d = d.to(dtype).float()
    d[::7] = 0.0
    if specials:
        d[5::97] = float("inf")
        d[6::89] = -float("inf")
        d[8::101] = float("nan")
    base = torch.randn(n, generator=gen).to(torch.bfloat16).float()
    x = (base + d).reshape(shape).to(dtype)  # base + inf = inf, so d stays inf / NaN
    base = base.reshape(shape).to(dtype)
    args = (x, base, della_fibres(x.shape), 0.4, 0.15, (1 << 40) + 17)
    assert torch.equal(native_della(*args, ranking=ranking)[0], _reference_della_keep(*args))


@pytest.mark.skipif("native" not in ACCELERATED, reason="native extension not built")
@pytest.mark.parametrize("row_len", [2, 15, 16, 17, 31, 33, 100, 2053])
@pytest.mark.parametrize("odd_share", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("ranking", DELLA_RANKINGS)
def test_native_della_mask_ranks_rows_of_few_distinct_magnitudes(row_len, odd_share, ranking):
    """Rows of only four exact magnitudes, so every 16 elements hold many equal ones (the
    vectorised rank pass counts them per lane), mixed in position with fp32 magnitudes whose low
    16 bits are set (handed over to the sorted pass from the same 16 elements), at row lengths
    around multiples of 16."""
    from fastmerge.ops.ties import _reference_della_keep, della_fibres

    gen = torch.Generator().manual_seed(row_len)
    shape = (7, row_len)
    levels = torch.tensor([0.0, 2.0 ** -9, 3 * 2.0 ** -9, 2.0 ** -7])
    d = levels[torch.randint(0, 4, shape, generator=gen)]
    odd = torch.rand(shape, generator=gen) < odd_share
    d[odd] = (2.0 ** -9) * (1.0 + torch.randint(1, 64, (int(odd.sum()),), generator=gen).float() * 2.0 ** -20)
    d = d * torch.where(torch.rand(shape, generator=gen) < 0.5, 1.0, -1.0)
    base = torch.zeros(shape)
    for key in (3, (1 << 33) + 5):
        args = (d, base, della_fibres(d.shape), 0.5, 0.45, key)
        assert torch.equal(native_della(*args, ranking=ranking)[0], _reference_della_keep(*args))


@pytest.mark.skipif("native" not in ACCELERATED, reason="native extension not built")
@pytest.mark.parametrize("ranking", DELLA_RANKINGS)
def test_native_della_mask_ranks_magnitudes_that_share_a_bf16_bin(ranking):
    """Most of each row in one bf16 bin [1, 1 + 2^-7): an exact 1.0 (ranked by position), and
    fp32 values 1 + j 2^-20 that differ only in their low 16 bits (ranked by value, ties by
    position) and must all rank above the 1.0s. Short rows make one rank step worth 0.1% of
    keep probability, so a misordered bin changes the mask."""
    from fastmerge.ops.ties import _reference_della_keep, della_fibres

    gen = torch.Generator().manual_seed(4)
    shape = (40, 300)
    d = 1.0 + torch.randint(0, 40, shape, generator=gen).float() * 2.0 ** -20
    d[torch.rand(shape, generator=gen) < 0.3] = 1.0
    d[torch.rand(shape, generator=gen) < 0.1] = 0.0
    d[torch.rand(shape, generator=gen) < 0.1] = 0.5
    d = d * torch.where(torch.rand(shape, generator=gen) < 0.5, 1.0, -1.0)
    base = torch.zeros(shape)
    args = (d, base, della_fibres(d.shape), 0.5, 0.3, 99)
    assert torch.equal(native_della(*args, ranking=ranking)[0], _reference_della_keep(*args))


@pytest.mark.skipif("native" not in ACCELERATED, reason="native extension not built")
@pytest.mark.parametrize("shape, bits", [((5, 2048), True), ((3, 5000), True), ((4096,), True), ((7, 72), True),
                                         ((9, 100), False), ((4, 700, 3), False), ((9, 2), False), ((64, 17), False)])
@pytest.mark.parametrize("threads", [1, 3])
def test_native_della_mask_packs_whole_byte_rows_as_bits(shape, bits, threads):
    """The kernel writes MASK_BITS exactly where every unit-stride row is whole bytes of the mask
    (row length a multiple of 8), and those bits are its byte mask packed (bit e % 8 of byte
    e / 8, packed here with torch); other shapes keep a byte per element, and asking the kernel
    for bits there is an error, since two threads' rows would share a byte."""
    from fastmerge import _native
    from fastmerge.dtypes import native_code
    from fastmerge.ops.ties import MASK_BITS, MASKED, della_fibres

    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).to(torch.bfloat16)
    base = torch.zeros(shape, dtype=torch.bfloat16)
    fibres = della_fibres(x.shape)
    call = (x.data_ptr(), native_code(x.dtype), base.data_ptr(), native_code(base.dtype), *fibres, 0.5, 0.3, 77)
    with native_threads(threads):
        keep, mode, _ = native_della(x, base, fibres, 0.5, 0.3, 77)
        dense = torch.zeros(x.numel(), dtype=torch.uint8)
        _native.della_mask(*call, dense.data_ptr(), False)
        assert mode == (MASK_BITS if bits else MASKED)
        assert torch.equal(keep, dense.bool())
        if not bits:
            with pytest.raises(ValueError, match="bits only for unit-stride rows"):
                _native.della_mask(*call, torch.zeros(x.numel(), dtype=torch.uint8).data_ptr(), True)
            return
        packed = torch.full(((x.numel() + 7) // 8,), 0xA5, dtype=torch.uint8)  # every byte is written
        _native.della_mask(*call, packed.data_ptr(), True)
    weights = 2 ** torch.arange(8, dtype=torch.int32)
    expected = (dense.reshape(-1, 8).int() * weights).sum(dim=1).to(torch.uint8)
    assert torch.equal(packed, expected)


def _sequential_lane_l1(values: torch.Tensor, lanes: int = 65536) -> float:
    """sum |values| in fp64 the way the rescale pass fixes it, written out: lane l adds elements
    l, l + lanes, ... one row at a time, then the lane sums are added one by one from lane 0."""
    import numpy as np

    v = np.abs(values.double().numpy())
    acc = np.zeros(lanes)
    for row in range(0, v.size, lanes):
        part = v[row:row + lanes]
        acc[:part.size] += part
    total = 0.0
    for lane_sum in acc.tolist():
        total += lane_sum
    return total


@pytest.mark.skipif("native" not in ACCELERATED, reason="native extension not built")
@pytest.mark.parametrize("shape, classes", [((9000, 64), 1024), ((301, 2048), 32), ((2048,), 32), ((161, 4096), 16),
                                            ((2, 32768), 2), ((3, 5000), 0), ((40, 8, 3), 0)])
@pytest.mark.parametrize("threads", [1, 3])
def test_native_della_mask_makes_the_rescale_sums_in_lane_order(shape, classes, threads):
    """Where DELLA's unit-stride rows divide the L1 lane count into at least one residue class of
    rows per thread (`classes`: 65536 / row length), the mask kernel returns the rescale pass's
    two sums, equal to the sequential lane-order sums of |d| and of the kept |d|, whatever the
    thread count; otherwise None (the rescale pass runs). fp32 magnitudes over 80 exponents in
    9-11 rows of 16 lanes, so that a sum in another order rounds differently."""
    from fastmerge.ops.ties import della_fibres

    gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    n = int(torch.tensor(shape).prod())
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-40, 40, (n,), generator=gen).float())
    x[torch.arange(n) % 65536 >= 16] = 0.0  # the total is then 16 lanes' sums, no lane's last bits lost in it
    x, base = x.reshape(shape), torch.zeros(shape)  # d = x, all 24 bits of it
    with native_threads(threads) as team:
        keep, _, sums = native_della(x, base, della_fibres(shape), 0.4, 0.15, 12345, l1=True)
        keep_alone, _, none = native_della(x, base, della_fibres(shape), 0.4, 0.15, 12345)
    assert torch.equal(keep, keep_alone) and none is None
    if classes < team:
        assert sums is None
        return
    delta = x.reshape(-1).float() - base.reshape(-1).float()
    assert sums == (_sequential_lane_l1(delta), _sequential_lane_l1(torch.where(keep, delta, 0.0)))
