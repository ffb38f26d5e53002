"""The TIES-family merge as one fused op: task_arithmetic, ties, dare_linear, dare_ties,
breadcrumbs(_ties), della(_linear) are all `ties_merge` with different sparsifiers and flags.

Pipeline (METHODS.md): d_i = x_i - b; sparsify d_i; W_i = w_i d_i; with `consensus`, elect
s = +1 where sum_i W_i >= 0 else -1 and keep model i where sign(W_i) == s (zeros never count);
mixed = sum of the kept W_i, div = sum of the kept w_i (0 -> 1); if normalize, mixed /= div;
out = b + lam * mixed.

Exact arithmetic (every backend gives these bytes; weights, lam, densities and scales are first
rounded to fp32):
  1. per model i in order: d = fp32(x_i - b); d = kept ? fp32(d * scale_i) : 0
     (scale_i = 1 without rescale);
  2. elect = 0; for i in order: elect = fma(w_i, d_i, elect);
  3. consensus: mixed = 0, div = 0; for i in order, where d_i != 0, w_i != 0 and
     sign(w_i) * sign(d_i) == (elect >= 0 ? +1 : -1): mixed = fma(w_i, d_i, mixed),
     div = fp32(div + w_i). Without consensus: mixed = elect, div = fp32 sum of all w_i in order,
     replaced by 1 when |div| < 1e-8 (mergekit's rule for a plain weight sum);
  4. normalize: mixed = fp32(mixed / (div == 0 ? 1 : div)) (IEEE division);
  5. out = round_to_nearest_even(fma(lam, mixed, b)) into out_dtype.
The sign of W_i is taken exactly from the signs of w_i and d_i (a rounded product could underflow
to zero).

Sparsifiers (per model, chosen before the element pass so the pass is a pure function of the
element index; the K deltas are recomputed from the inputs, never materialised):
  magnitude           keep-exactly-k top int(density*n) of |d| (histogram threshold, or a given
                      model-wide `Threshold` per model);
  magnitude_outliers  breadcrumbs, as mergekit: keep int(density*n) elements, dropping the top
                      int(gamma*n) outliers, or fewer when the two exceed n (`outlier_ranks`);
                      density >= 1 keeps everything;
  random              DARE: keep where philox_uniform(key_i, index) < density_i, with
                      key_i = derive_key(seed, tensor_name, i) (fastmerge/ops/random.py);
  della               rank |d| along dim 1 (mergekit's axis; 0/1-dim tensors are one row), keep
                      where philox_uniform(key_i, index) < fp32((density - eps) + 2 eps rank /
                      (row_len - 1)) (rank 0-based ascending, ties by position); density <= 0
                      keeps nothing, >= 1 everything. The mask is computed per tensor (reference:
                      torch sort; native: csrc della_mask, per-fibre counting rank; a GPU:
                      torch sort with the Triton draws) and the element pass reads it
                      (native: as bits where rows are whole bytes).
gamma and epsilon are one value or one per model. rescale=True multiplies kept values by
||d||_1 / ||kept||_1 ("l1": fp64 sums in the fixed lane order of csrc/dare.cpp, ratio rounded to
fp32; 1 when either sum is below 1e-7, as mergekit) or by 1/density ("inverse_density").
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..dtypes import FLOAT_OUTPUT_DTYPES, native_code
from ..errors import KernelError
from ._checks import check_alike, check_numbers
from ._dispatch import helper_backend, resolve_backend
from ._fma import fma_f32
from .mask import packed_size, unpack_mask_reference
from .random import DRAW_BACKENDS, derive_key, uniform_draws
from .threshold import Threshold, density_to_k, magnitude_thresholds, threshold_backend, tie_cutoff

SPARSIFIERS = ("magnitude", "magnitude_outliers", "random", "della")
RESCALE_MODES = ("l1", "inverse_density")
FUSED_BACKENDS = ("reference", "native", "triton")
# Selector modes, as csrc/selection.h SparsifyMode.
KEEP_ALL, MAGNITUDE, OUTLIERS, RANDOM, MASKED, MASK_BITS = 0, 1, 2, 3, 4, 5
L1_LANES = 65536  # csrc/selection.h kL1Lanes
# mergekit 0.1.5's cut-offs: no rescale when an L1 sum is below RESCALE_EPS; a plain (no
# consensus) weight sum below PLAIN_DIV_EPS in magnitude divides by 1 instead.
RESCALE_EPS = 1e-7
PLAIN_DIV_EPS = float(np.float32(1e-8))


def _f32(v: float) -> float:
    return float(np.float32(v))


@dataclass(frozen=True)
class OutlierBand:
    """Breadcrumbs with given thresholds: keep what `reached` keeps and `dropped` does not
    (e.g. a model-wide band from MagnitudeHistogram with two ranks)."""

    dropped: Threshold
    reached: Threshold


def outlier_ranks(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(k_hi, k_lo): breadcrumbs keeps the top k_lo of |d| minus the top k_hi.

    mergekit sorts ascending and keeps positions [bottom, bottom + target) with target =
    int(density n), bottom = max(0, n - target - int(gamma n)): fewer outliers are dropped when
    density + gamma exceed the tensor. Clamped to [0, n], so density <= 0 keeps nothing."""
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    start = min(bottom, n)
    end = min(max(bottom + target, start), n)
    return n - end, n - start


@dataclass
class Selector:
    """One model's sparsifier, resolved to what the element pass needs (csrc/selection.h)."""

    mode: int = KEEP_ALL
    t_hi: int = 0
    cut_hi: int = 0
    t_lo: int = 0
    cut_lo: int = 0
    key: int = 0
    density: float = 1.0
    # MASKED: bool per element; MASK_BITS: a packed bitmask (ops/mask.py's bit order)
    keep: torch.Tensor | None = field(default=None, repr=False)
    # (sum |d|, sum of kept |d|) in the L1 lane order, where making the mask made them too.
    l1: tuple[float, float] | None = None


# ---------------------------------------------------------------- exact fp32 helpers (torch)

def _abs_bits(d: torch.Tensor) -> torch.Tensor:
    return d.view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def _in_top(bits: torch.Tensor, index: torch.Tensor, t: int, cut: int) -> torch.Tensor:
    return (bits > t) | ((bits == t) & (index < cut))


def reference_keep(d: torch.Tensor, sel: Selector) -> torch.Tensor:
    """The kept mask of one flat fp32 task vector under `sel` (the oracle of the kernels)."""
    if sel.mode == KEEP_ALL:
        return torch.ones_like(d, dtype=torch.bool)
    bits, index = _abs_bits(d), torch.arange(d.numel(), device=d.device)
    if sel.mode == MAGNITUDE:
        return _in_top(bits, index, sel.t_hi, sel.cut_hi)
    if sel.mode == OUTLIERS:
        return _in_top(bits, index, sel.t_lo, sel.cut_lo) & ~_in_top(bits, index, sel.t_hi, sel.cut_hi)
    if sel.mode == MASKED:
        return sel.keep
    if sel.mode == MASK_BITS:
        return unpack_mask_reference(sel.keep.to(d.device), d.shape)
    u = uniform_draws(sel.key, d.numel(), device=d.device, backend="reference")
    return u < torch.tensor(sel.density, dtype=torch.float32)


def lane_l1(values: torch.Tensor) -> float:
    """sum |values| in fp64 in the fixed lane order of csrc/dare.cpp: lane l adds elements
    l, l + L, ... in order (cumsum is a strictly sequential accumulate), then lanes in order."""
    v = np.abs(values.detach().double().cpu().numpy())
    rows = -(-v.size // L1_LANES)
    padded = np.zeros(max(rows, 1) * L1_LANES)
    padded[: v.size] = v
    return _in_lane_order(np.cumsum(padded.reshape(-1, L1_LANES), axis=0)[-1])


def _in_lane_order(lane_sums: np.ndarray) -> float:
    """The total of the per-lane sums, lane 0 first (the last step of the fixed L1 order)."""
    return float(np.cumsum(lane_sums)[-1])


# ---------------------------------------------------------------- per-model selection

def della_fibres(shape: torch.Size) -> tuple[int, int, int]:
    """(outer, row_len, inner): the tensor as [outer, row_len, inner] with DELLA's ranking axis
    in the middle: dim 1 as mergekit (which lifts 0/1-dim tensors to one row first)."""
    if len(shape) < 2:
        return 1, int(np.prod(shape)) if len(shape) else 1, 1
    return int(shape[0]), int(shape[1]), int(np.prod(shape[2:]))


def _della_probability(rank: torch.Tensor, row_len: int, density: float, epsilon: float) -> torch.Tensor:
    """fp32((density - eps) + (2 eps) * rank / (row_len - 1)), the expression in fp64."""
    return ((density - epsilon) + 2 * epsilon * rank.double() / (row_len - 1)).float()


def _reference_della_keep(x, base, fibres, density, epsilon, key, draws: str = "reference") -> torch.Tensor:
    """The DELLA mask by torch's sort: the oracle, and the path for tensors on a GPU, where the
    sort runs on the device and `draws` = "triton" draws there too (the same bits as the
    oracle's numpy Philox, which would take about an hour on the CPU for a 7B merge)."""
    outer, row_len, inner = fibres
    d = (x.reshape(-1).float() - base.reshape(-1).float()).abs()
    rows = d.reshape(outer, row_len, inner).transpose(1, 2)
    order = torch.argsort(rows, dim=2, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(2, order, torch.arange(row_len, device=d.device).expand_as(order))
    p = _della_probability(rank, row_len, density, epsilon).transpose(1, 2).reshape(-1)
    return uniform_draws(key, d.numel(), device=d.device, backend=draws) < p


def _native_della_keep(x, base, fibres, density, epsilon, key, ranking: int = 0, l1: bool = False,
                       packed: bool = True) -> Selector:
    """The native kernel's mask as a selector: with `packed` (the native element pass reads bits;
    the Triton one reads bytes), MASK_BITS where every row is whole bytes of the mask (unit
    stride, a multiple of 8 elements: all of a Llama's 2-d weights), which has an eighth of the
    pages to fault in and of the bytes the merge reads; else MASKED. With `l1`, the
    rescale pass's two L1 sums where the kernel could make them on the way (csrc/selection.h),
    else None. `ranking`: 0 ranks rows the way that is faster on this CPU, 1 with the scalar
    passes, 2 16 elements at a time (AVX-512 builds); the mask is the same."""
    from .. import _native

    _, row_len, inner = fibres
    bits = packed and inner == 1 and row_len % 8 == 0
    keep = torch.empty(packed_size(x.numel()) if bits else x.numel(), dtype=torch.uint8 if bits else torch.bool)
    sums = _native.della_mask(x.data_ptr(), native_code(x.dtype), base.data_ptr(), native_code(base.dtype), *fibres,
                              density, epsilon, key, keep.data_ptr(), bits, ranking, l1)
    return Selector(MASK_BITS if bits else MASKED, keep=keep, l1=sums)


def _della_selector(x, base, density, epsilon, key, name, backend, l1: bool, packed: bool, draws: str) -> Selector:
    """DELLA as mergekit: density >= 1 keeps all, <= 0 nothing; otherwise density +- epsilon must
    lie in (0, 1) and each fibre along dim 1 needs 2+ elements (mergekit's rank normalisation
    divides by row_len - 1). `l1`: the L1 rescale will want the sums (the native kernel may make
    them with the mask); `packed`: the element pass reads a packed mask; `draws`: the backend of
    the Philox draws where the mask is not native."""
    if density >= 1.0:
        return Selector()
    if density <= 0.0:
        return Selector(RANDOM, key=key, density=0.0)  # u < 0 never holds
    if not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise KernelError(f"{name}: della needs 0 < density - epsilon and density + epsilon < 1 "
                          f"(density={density}, epsilon={epsilon})")
    fibres = della_fibres(x.shape)
    if fibres[1] < 2:
        raise KernelError(f"{name}: della ranks |d| along dim 1, which has {fibres[1]} element(s) in shape "
                          f"{tuple(x.shape)}; it needs at least 2 (mergekit fails on this tensor too)")
    if backend != "native":
        return Selector(MASKED, keep=_reference_della_keep(x, base, fibres, density, epsilon, key, draws))
    return _native_della_keep(x, base, fibres, density, epsilon, key, l1=l1, packed=packed)


def _magnitude_params(x, base, ks: Sequence[int], backend: str, name: str) -> list[int]:
    """(threshold bits, tie cut-off) of the top k of |x - base| for each k, flattened."""
    params = []
    for t in magnitude_thresholds(x, ks, base=base, backend=backend, name=name):
        params += [t.bits, tie_cutoff(x, t, base=base, backend=backend)]
    return params


def _given_threshold(x, base, threshold: Threshold | OutlierBand, backend: str) -> Selector:
    if isinstance(threshold, OutlierBand):
        dropped, reached = threshold.dropped, threshold.reached
        return Selector(OUTLIERS, dropped.bits, tie_cutoff(x, dropped, base=base, backend=backend),
                        reached.bits, tie_cutoff(x, reached, base=base, backend=backend))
    return Selector(MAGNITUDE, threshold.bits, tie_cutoff(x, threshold, base=base, backend=backend))


def _selector(i, x, base, density, threshold, sparsify, gamma, epsilon, seed, tensor_name, backend,
              l1: bool, who: str) -> Selector:
    """Model i's (`who`, in errors) selector; `l1`: the L1 rescale follows (DELLA's native mask
    may bring its sums)."""
    n = x.numel()
    name = f"{tensor_name or 'tensor'} ({who})"
    sel_backend = threshold_backend(x.device, backend)
    if threshold is not None:
        return _given_threshold(x, base, threshold, sel_backend)
    if density >= 1.0:
        return Selector()
    if sparsify == "magnitude_outliers":
        k_hi, k_lo = outlier_ranks(n, density, gamma)
        return Selector(OUTLIERS, *_magnitude_params(x, base, (k_hi, k_lo), sel_backend, name))
    if sparsify == "magnitude":
        return Selector(MAGNITUDE, *_magnitude_params(x, base, [density_to_k(density, n)], sel_backend, name))
    key = derive_key(seed, tensor_name, i)
    if sparsify == "random":
        return Selector(RANDOM, key=key, density=_f32(density))
    return _della_selector(x, base, density, epsilon, key, name, sel_backend, l1, packed=backend == "native",
                           draws=helper_backend(x.device, DRAW_BACKENDS, backend))


def _rescale(x, base, sel: Selector, density: float, mode: str, backend: str) -> tuple[float, Selector]:
    """The fp32 factor applied to kept values (see the module docstring), and the selector the
    element pass should use: on the native backend a `random` selector comes back as the mask
    (MASK_BITS) of the values the L1 pass kept nonzero, so the Philox draws are made once per
    model, not twice.
    That mask drops kept zeros, which is exact only while the factor is finite (0 * inf is NaN),
    so an infinite or NaN factor keeps the draws. A selector that brings its sums (`l1`) needs
    no pass here."""
    if mode == "inverse_density":
        return (_f32(1.0 / density) if density > 0 else 1.0), sel
    replay = None
    if sel.l1 is not None:
        all_l1, kept_l1 = sel.l1
    elif backend == "native":
        from .. import _native

        replay = torch.empty(packed_size(x.numel()), dtype=torch.uint8) if sel.mode == RANDOM else None
        all_l1, kept_l1 = _native.kept_l1(
            x.data_ptr(), native_code(x.dtype), base.data_ptr(), native_code(base.dtype), x.numel(),
            sel.mode, sel.t_hi, sel.cut_hi, sel.t_lo, sel.cut_lo, sel.key, sel.density, _mask_ptr(sel),
            replay.data_ptr() if replay is not None else 0)
    elif backend == "triton":
        from .triton_kernels.lane_l1 import kept_l1_lanes

        all_l1, kept_l1 = map(_in_lane_order, kept_l1_lanes(x, base, sel, L1_LANES))
    else:
        d = x.reshape(-1).float() - base.reshape(-1).float()
        all_l1, kept_l1 = lane_l1(d), lane_l1(torch.where(reference_keep(d, sel), d, 0.0))
    scale = 1.0 if all_l1 < RESCALE_EPS or kept_l1 < RESCALE_EPS else _f32(all_l1 / kept_l1)
    if replay is not None and math.isfinite(scale):
        sel = Selector(MASK_BITS, keep=replay)
    return scale, sel


def _mask_ptr(sel: Selector) -> int:
    return sel.keep.data_ptr() if sel.keep is not None else 0


# ---------------------------------------------------------------- element pass

def _reference_pass(base, inputs, weights, scales, selectors, consensus, normalize, lam, out_dtype):
    b = base.reshape(-1).float()
    zero = torch.zeros_like(b)
    deltas, elect = [], zero
    for x, w, scale, sel in zip(inputs, weights, scales, selectors):
        d = x.reshape(-1).float() - b
        d = torch.where(reference_keep(d, sel), d * torch.tensor(scale, dtype=torch.float32), zero)
        deltas.append(d)
        elect = fma_f32(torch.tensor(w, dtype=torch.float32), d, elect)
    if consensus:
        mixed, div = zero, zero
        positive = elect >= 0
        for w, d in zip(weights, deltas):
            agrees = (d != 0) & (w != 0) & (((d > 0) == (w > 0)) == positive)
            w32 = torch.tensor(w, dtype=torch.float32)
            mixed = torch.where(agrees, fma_f32(w32, d, mixed), mixed)
            div = torch.where(agrees, div + w32, div)
    else:
        mixed, div = elect, torch.full_like(b, plain_divisor(weights))
    if normalize:
        mixed = mixed / torch.where(div == 0, torch.ones_like(div), div)
    out = fma_f32(torch.tensor(lam, dtype=torch.float32), mixed, b)
    return out.to(out_dtype).reshape(base.shape)


def plain_divisor(weights: Sequence[float]) -> float:
    """The divisor without consensus: the fp32 sum of the weights in order, 1 when its
    magnitude is below 1e-8 (mergekit)."""
    total = np.float32(0)
    for w in weights:
        total = np.float32(total + np.float32(w))
    return 1.0 if abs(total) < PLAIN_DIV_EPS else float(total)


def _native_pass(base, inputs, weights, scales, selectors, consensus, normalize, lam, out_dtype):
    from .. import _native

    out = torch.empty(base.shape, dtype=out_dtype)
    _native.ties_merge(
        out.data_ptr(), native_code(out_dtype), base.data_ptr(), native_code(base.dtype), base.numel(),
        [x.data_ptr() for x in inputs], [native_code(x.dtype) for x in inputs], weights, scales,
        [s.mode for s in selectors], [s.t_hi for s in selectors], [s.cut_hi for s in selectors],
        [s.t_lo for s in selectors], [s.cut_lo for s in selectors], [s.key for s in selectors],
        [s.density for s in selectors], [_mask_ptr(s) for s in selectors], consensus, normalize, lam)
    return out


def _triton_pass(base, inputs, weights, scales, selectors, consensus, normalize, lam, out_dtype):
    from .triton_kernels.ties import ties_pass

    return ties_pass(base, inputs, weights, scales, selectors, consensus, normalize, lam, out_dtype)


_PASSES = {"reference": _reference_pass, "native": _native_pass, "triton": _triton_pass}


# ---------------------------------------------------------------- entry point

def _per_model(name: str, value: float | Sequence[float], count: int) -> list[float]:
    """One value for every model, or one per model."""
    if isinstance(value, numbers.Real):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise KernelError(f"ties_merge: {count} inputs but {len(values)} {name} values")
    return values


def _check(base, inputs, weights, densities, thresholds, sparsify, rescale_mode, out_dtype, lam):
    if base is None:
        raise KernelError("ties_merge needs the base model's tensor (task vectors are x_i - base)")
    if not inputs:
        raise KernelError("ties_merge needs at least one input tensor")
    for name, values in (("weights", weights), ("densities", densities), ("thresholds", thresholds)):
        if values is not None and not isinstance(values, Sequence):
            raise KernelError(f"ties_merge: {name} must be a list with one value per input, got {values!r}")
        if values is not None and len(values) != len(inputs):
            raise KernelError(f"ties_merge: {len(inputs)} inputs but {len(values)} {name}")
    check_numbers("ties_merge", "weights", weights)
    check_numbers("ties_merge", "densities", densities or [])  # out of [0, 1]: mergekit's clamps (configs refuse)
    check_numbers("ties_merge", "lam", [lam])
    check_alike("ties_merge", [("base", base)] + [(f"input {i}", x) for i, x in enumerate(inputs)])
    if sparsify not in SPARSIFIERS:
        raise KernelError(f"unknown sparsify {sparsify!r}; use one of {', '.join(SPARSIFIERS)}")
    if rescale_mode not in RESCALE_MODES:
        raise KernelError(f"unknown rescale_mode {rescale_mode!r}; use one of {', '.join(RESCALE_MODES)}")
    if out_dtype not in FLOAT_OUTPUT_DTYPES:
        raise KernelError(f"ties_merge writes fp32, fp16 or bf16, not {out_dtype}")


def ties_merge(
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    thresholds: Sequence[Threshold | None] | None = None,
    normalize: bool = True,
    lam: float = 1.0,
    out_dtype: torch.dtype | None = None,
    sparsify: str = "magnitude",
    consensus: bool = True,
    rescale: bool = False,
    rescale_mode: str = "l1",
    gamma: float | Sequence[float] = 0.01,
    epsilon: float | Sequence[float] = 0.15,
    seed: int = 0,
    tensor_name: str = "",
    backend: str | None = None,
    input_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Merge `inputs` into `base` with the TIES-family pipeline (module docstring).

    densities: per-model keep fraction (default 1: nothing trimmed). thresholds: per-model
    given thresholds used instead of densities (e.g. model-wide ones from MagnitudeHistogram):
    a `Threshold` for magnitude trimming, an `OutlierBand` for breadcrumbs; None entries defer
    to the density. gamma (breadcrumbs) and epsilon (della): one value or one per model. seed
    and tensor_name key the random sparsifiers. input_names name the inputs in errors (default:
    "model <index>"). Returns a new tensor of base's shape in out_dtype (default base's dtype).
    """
    inputs = [x.contiguous() for x in inputs]
    base = base.contiguous() if base is not None else None
    out_dtype = out_dtype or (base.dtype if base is not None else None)
    _check(base, inputs, weights, densities, thresholds, sparsify, rescale_mode, out_dtype, lam)
    name = resolve_backend("ties_merge", [base, *inputs], FUSED_BACKENDS, backend)
    if base.numel() == 0:
        return torch.empty(base.shape, dtype=out_dtype, device=base.device)
    densities = list(densities) if densities is not None else [1.0] * len(inputs)
    thresholds = list(thresholds) if thresholds is not None else [None] * len(inputs)
    gammas, epsilons = _per_model("gamma", gamma, len(inputs)), _per_model("epsilon", epsilon, len(inputs))
    check_numbers("ties_merge", "gamma", gammas, 0.0, 1.0)  # the share of the largest changes breadcrumbs drops
    check_numbers("ties_merge", "epsilon", epsilons)
    selectors, scales = [], []
    for i, (x, density, threshold) in enumerate(zip(inputs, densities, thresholds)):
        who = input_names[i] if input_names is not None else f"model {i}"
        sel = _selector(i, x, base, density, threshold, sparsify, gammas[i], epsilons[i], seed, tensor_name, name,
                        l1=rescale and rescale_mode == "l1", who=who)
        scale = 1.0
        if rescale:
            scale, sel = _rescale(x, base, sel, density, rescale_mode, name)
        selectors.append(sel)
        scales.append(scale)
    weights = [_f32(w) for w in weights]
    return _PASSES[name](base, inputs, weights, scales, selectors, consensus, normalize, _f32(lam), out_dtype)
