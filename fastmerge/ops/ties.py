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
     div = fp32(div + w_i). Without consensus: mixed = elect, div = fp32 sum of all w_i in order;
  4. normalize: mixed = fp32(mixed / (div == 0 ? 1 : div)) (IEEE division);
  5. out = round_to_nearest_even(fma(lam, mixed, b)) into out_dtype.
The sign of W_i is taken exactly from the signs of w_i and d_i (a rounded product could underflow
to zero).

Sparsifiers (per model, chosen before the element pass so the pass is a pure function of the
element index; the K deltas are recomputed from the inputs, never materialised):
  magnitude           keep-exactly-k top int(density*n) of |d| (histogram threshold, or a given
                      model-wide `Threshold` per model);
  magnitude_outliers  breadcrumbs: drop the top int(gamma*n), keep the next int(density*n);
  random              DARE: keep where philox_uniform(key_i, index) < density_i, with
                      key_i = derive_key(seed, tensor_name, i) (fastmerge/ops/random.py);
  della               per-row rank-based keep probability; reference backend only.
rescale=True multiplies kept values by ||d||_1 / ||kept||_1 ("l1": fp64 sums in the fixed lane
order of csrc/dare.cpp, ratio rounded to fp32; 1 when nothing is kept) or by 1/density
("inverse_density").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..dtypes import FLOAT_OUTPUT_DTYPES, native_code
from ..errors import KernelError
from ._dispatch import resolve_backend
from ._fma import fma_f32
from .random import derive_key, philox_uniform
from .threshold import Threshold, density_to_k, magnitude_threshold, tie_cutoff

SPARSIFIERS = ("magnitude", "magnitude_outliers", "random", "della")
RESCALE_MODES = ("l1", "inverse_density")
FUSED_BACKENDS = ("reference", "native", "triton")
# Selector modes, as csrc/selection.h SparsifyMode.
KEEP_ALL, MAGNITUDE, OUTLIERS, RANDOM = 0, 1, 2, 3
L1_LANES = 65536  # csrc/selection.h kL1Lanes


def _f32(v: float) -> float:
    return float(np.float32(v))


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
    della_keep: torch.Tensor | None = field(default=None, repr=False)


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
    if sel.della_keep is not None:
        return sel.della_keep
    u = torch.from_numpy(philox_uniform(sel.key, 0, d.numel())).to(d.device)
    return u < torch.tensor(sel.density, dtype=torch.float32)


def lane_l1(values: torch.Tensor) -> float:
    """sum |values| in fp64 in the fixed lane order of csrc/dare.cpp: lane l adds elements
    l, l + L, ... in order (cumsum is a strictly sequential accumulate), then lanes in order."""
    v = np.abs(values.detach().double().cpu().numpy())
    rows = -(-v.size // L1_LANES)
    padded = np.zeros(max(rows, 1) * L1_LANES)
    padded[: v.size] = v
    lanes = np.cumsum(padded.reshape(-1, L1_LANES), axis=0)[-1]
    return float(np.cumsum(lanes)[-1])


# ---------------------------------------------------------------- per-model selection

def _della_keep(d: torch.Tensor, shape: torch.Size, density: float, epsilon: float, key: int) -> torch.Tensor:
    """DELLA: rank |d| within each row (last dim; stable, ascending), keep with probability
    (density - eps) + 2 eps rank / (row_len - 1), drawing u from the same Philox stream as DARE."""
    if not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise KernelError(f"della needs 0 < density - epsilon and density + epsilon < 1 "
                          f"(density={density}, epsilon={epsilon})")
    rows = d.reshape(-1, shape[-1] if len(shape) else 1).abs()
    order = torch.argsort(rows, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(rows.shape[1], device=d.device).expand_as(order))
    span = max(rows.shape[1] - 1, 1)
    p = ((density - epsilon) + 2 * epsilon * rank.double() / span).float().reshape(-1)
    u = torch.from_numpy(philox_uniform(key, 0, d.numel())).to(d.device)
    return u < p


def _magnitude_params(x, base, k: int, backend: str, name: str) -> tuple[int, int]:
    """(threshold bits, tie cut-off) of the top k of |x - base|."""
    t = magnitude_threshold(x, k, base=base, backend=backend, name=name)
    return t.bits, tie_cutoff(x, t, base=base, backend=backend)


def _selector(i, x, base, density, threshold, sparsify, gamma, epsilon, seed, tensor_name, backend) -> Selector:
    n = x.numel()
    name = f"{tensor_name or 'tensor'} (model {i})"
    sel_backend = "native" if backend in ("native", "triton") and x.device.type == "cpu" else "reference"
    if threshold is not None:
        return Selector(MAGNITUDE, threshold.bits, tie_cutoff(x, threshold, base=base, backend=sel_backend))
    if sparsify == "magnitude_outliers":
        k_hi = int(gamma * n)
        k_lo = k_hi + density_to_k(density, n)
        t_hi, cut_hi = _magnitude_params(x, base, k_hi, sel_backend, name)
        t_lo, cut_lo = _magnitude_params(x, base, k_lo, sel_backend, name)
        return Selector(OUTLIERS, t_hi, cut_hi, t_lo, cut_lo)
    if density >= 1.0:
        return Selector()
    if sparsify == "magnitude":
        return Selector(MAGNITUDE, *_magnitude_params(x, base, density_to_k(density, n), sel_backend, name))
    key = derive_key(seed, tensor_name, i)
    if sparsify == "random":
        return Selector(RANDOM, key=key, density=_f32(density))
    d = x.reshape(-1).float() - base.reshape(-1).float()
    return Selector(RANDOM, key=key, density=_f32(density),
                    della_keep=_della_keep(d, x.shape, density, epsilon, key))


def _rescale(x, base, sel: Selector, density: float, mode: str, backend: str) -> float:
    """The fp32 factor applied to kept values (see the module docstring)."""
    if mode == "inverse_density":
        return _f32(1.0 / density) if density > 0 else 1.0
    if backend == "native" and sel.della_keep is None:
        from .. import _native

        all_l1, kept_l1 = _native.kept_l1(
            x.data_ptr(), native_code(x.dtype), base.data_ptr(), native_code(base.dtype), x.numel(),
            sel.mode, sel.t_hi, sel.cut_hi, sel.t_lo, sel.cut_lo, sel.key, sel.density)
    else:
        d = x.reshape(-1).float() - base.reshape(-1).float()
        all_l1, kept_l1 = lane_l1(d), lane_l1(torch.where(reference_keep(d, sel), d, 0.0))
    return _f32(all_l1 / kept_l1) if kept_l1 > 0 else 1.0


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
        mixed, div = elect, torch.full_like(b, _sum_f32(weights))
    if normalize:
        mixed = mixed / torch.where(div == 0, torch.ones_like(div), div)
    out = fma_f32(torch.tensor(lam, dtype=torch.float32), mixed, b)
    return out.to(out_dtype).reshape(base.shape)


def _sum_f32(values: Sequence[float]) -> float:
    total = np.float32(0)
    for v in values:
        total = np.float32(total + np.float32(v))
    return float(total)


def _native_pass(base, inputs, weights, scales, selectors, consensus, normalize, lam, out_dtype):
    from .. import _native

    out = torch.empty(base.shape, dtype=out_dtype)
    _native.ties_merge(
        out.data_ptr(), native_code(out_dtype), base.data_ptr(), native_code(base.dtype), base.numel(),
        [x.data_ptr() for x in inputs], [native_code(x.dtype) for x in inputs], weights, scales,
        [s.mode for s in selectors], [s.t_hi for s in selectors], [s.cut_hi for s in selectors],
        [s.t_lo for s in selectors], [s.cut_lo for s in selectors], [s.key for s in selectors],
        [s.density for s in selectors], consensus, normalize, lam)
    return out


def _triton_pass(base, inputs, weights, scales, selectors, consensus, normalize, lam, out_dtype):
    from .triton_kernels.ties import ties_pass

    return ties_pass(base, inputs, weights, scales, selectors, consensus, normalize, lam, out_dtype)


_PASSES = {"reference": _reference_pass, "native": _native_pass, "triton": _triton_pass}


# ---------------------------------------------------------------- entry point

def _check(base, inputs, weights, densities, thresholds, sparsify, rescale_mode, out_dtype):
    if base is None:
        raise KernelError("ties_merge needs the base model's tensor (task vectors are x_i - base)")
    if not inputs:
        raise KernelError("ties_merge needs at least one input tensor")
    for name, values in (("weights", weights), ("densities", densities), ("thresholds", thresholds)):
        if values is not None and len(values) != len(inputs):
            raise KernelError(f"ties_merge: {len(inputs)} inputs but {len(values)} {name}")
    for i, x in enumerate(inputs):
        if x.shape != base.shape or x.device != base.device:
            raise KernelError(f"ties_merge: input {i} has shape {tuple(x.shape)} on {x.device}, "
                              f"base has {tuple(base.shape)} on {base.device}")
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
    gamma: float = 0.01,
    epsilon: float = 0.15,
    seed: int = 0,
    tensor_name: str = "",
    backend: str | None = None,
) -> torch.Tensor:
    """Merge `inputs` into `base` with the TIES-family pipeline (module docstring).

    densities: per-model keep fraction (default 1: nothing trimmed). thresholds: per-model
    model-wide `Threshold` (MagnitudeHistogram.tensor_threshold) used instead of densities for
    magnitude trimming; None entries keep everything. seed and tensor_name key the random
    sparsifiers. Returns a new tensor of base's shape in out_dtype (default base's dtype).
    """
    inputs = [x.contiguous() for x in inputs]
    base = base.contiguous() if base is not None else None
    out_dtype = out_dtype or (base.dtype if base is not None else None)
    _check(base, inputs, weights, densities, thresholds, sparsify, rescale_mode, out_dtype)
    supported = ("reference",) if sparsify == "della" else FUSED_BACKENDS
    name = resolve_backend("ties_merge", [base, *inputs], supported, backend)
    if base.numel() == 0:
        return torch.empty(base.shape, dtype=out_dtype, device=base.device)
    densities = list(densities) if densities is not None else [1.0] * len(inputs)
    thresholds = list(thresholds) if thresholds is not None else [None] * len(inputs)
    selectors, scales = [], []
    for i, (x, density, threshold) in enumerate(zip(inputs, densities, thresholds)):
        sel = _selector(i, x, base, density, threshold, sparsify, gamma, epsilon, seed, tensor_name, name)
        selectors.append(sel)
        scales.append(_rescale(x, base, sel, density, rescale_mode, name) if rescale else 1.0)
    weights = [_f32(w) for w in weights]
    return _PASSES[name](base, inputs, weights, scales, selectors, consensus, normalize, _f32(lam), out_dtype)
