"""Spherical interpolation: slerp, nuslerp, multislerp (mergekit 0.1.5 semantics).

All three output a linear combination of their inputs whose coefficients come from inner
products alone, so each is a `geometry.gram` pass, a few fp64 scalars, and one `geometry.mix`
(the fused blend kernel) instead of a chain of full-size torch temporaries.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .base import TensorTask, register
from .contract import ContractMethod
from .geometry import gram, mix, norms, slerp_coefficients

# mergekit's constants: slerp falls back to lerp above this |cos|; norms at or below NORM_EPS
# count as 1 (zero vectors); nuslerp clamps norms at 1e-7 and lerps where 1 - cos^2 <= 1e-16.
SLERP_DOT_THRESHOLD = 0.9995
SLERP_NORM_EPS = 1e-8
NUSLERP_NORM_MIN = 1e-7
NUSLERP_COLINEAR_EPS = 1e-8


@register
class Slerp(ContractMethod):
    """Base + one model: (sin((1-t) theta) b + sin(t theta) x) / sin(theta) over the whole tensor,
    theta the angle between b and x; lerp when |cos theta| > 0.9995."""

    name = "slerp"
    global_params = {"t": None}
    required_global_params = ("t",)
    requires_base = True
    min_inputs = max_inputs = 1

    def merge(self, task: TensorTask) -> torch.Tensor:
        t = float(task.global_params["t"])
        pair = [task.base, task.inputs[0]]
        g = gram(pair)
        n = norms(g)
        n = torch.where(n > SLERP_NORM_EPS, n, torch.ones_like(n))
        cos = (g[0, 1] / (n[0] * n[1])).clamp(-1, 1)
        c0, c1 = slerp_coefficients(cos, t, cos.abs() > SLERP_DOT_THRESHOLD)
        return mix(pair, torch.stack([c0, c1]), task)


@register
class NuSlerp(ContractMethod):
    """Two models, t = w2 / (w1 + w2) (0.5 when the weights sum to ~0); with a base it slerps the
    task vectors and adds the base back. `nuslerp_flatten` (default true) treats the tensor as
    one vector; otherwise every fibre is slerped on its own: the rows (vectors along the last
    dimension) by default, the columns (vectors along dimension 0) with `nuslerp_row_wise`."""

    name = "nuslerp"
    required_model_params = ("weight",)
    global_params = {"nuslerp_row_wise": False, "nuslerp_flatten": True}
    min_inputs = max_inputs = 2

    def merge(self, task: TensorTask) -> torch.Tensor:
        w0, w1 = (float(p["weight"]) for p in task.params)
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        dim = None if task.global_params["nuslerp_flatten"] else (0 if task.global_params["nuslerp_row_wise"] else -1)
        g = gram(task.inputs, base=task.base, dim=dim)
        n = norms(g).clamp(min=NUSLERP_NORM_MIN)
        cos = (g[0, 1] / (n[0] * n[1])).clamp(-1, 1)
        c0, c1 = slerp_coefficients(cos, t, (1 - cos.square()) <= NUSLERP_COLINEAR_EPS**2)
        return mix(task.inputs, torch.stack([c0, c1]), task, base=task.base, dim=dim)


@register
class MultiSlerp(ContractMethod):
    """Weighted spherical mean of K models (task vectors with a base), norms restored.

    mergekit projects the unit vectors u_i onto the tangent space at their normalised weighted
    mean m = M / |M|, M = sum w_i u_i, averages there and maps back. That tangent average is
    sum w_i (u_i - <u_i, m> m) = M - <M, m> m = 0 exactly, and its exponential map, which adds
    eps to the tangent's norm, returns m cos(eps); the result is m cos(eps) sum w_i |v_i|: a
    weighted sum with coefficients c_i = w_i / (|v_i| + eps) * cos(eps) sum_j w_j |v_j| / |M|,
    where |M|^2 = c^T G c from the Gram matrix. (mergekit's fp32 evaluation adds rounding noise of
    ~1e-7 relative to this; cos(eps) is 1 in fp64 at the default eps, and 0.995 at eps 0.1.)
    """

    name = "multislerp"
    required_model_params = ("weight",)
    global_params = {"normalize_weights": True, "eps": 1e-8}

    def merge(self, task: TensorTask) -> torch.Tensor:
        if len(task.inputs) == 1:
            return task.inputs[0].to(task.out_dtype)
        eps = float(task.global_params["eps"])
        weights = torch.tensor([float(p["weight"]) for p in task.params], dtype=torch.float64)
        if task.global_params["normalize_weights"]:
            total = float(weights.sum())
            if total == 0:
                raise ConfigError(f"multislerp: the weights for tensor {task.name} sum to 0, so they cannot be normalised")
            weights = weights / total
        g3 = gram(task.inputs, base=task.base).cpu()
        g, n = g3[:, :, 0], norms(g3)[:, 0]
        unit = weights / (n + eps)
        mean_norm = math.sqrt(max(0.0, float(unit @ g @ unit)))
        if mean_norm < eps:
            if len(task.inputs) == 2:
                return mix(task.inputs, weights, task, base=task.base)
            raise ConfigError(
                f"multislerp: the weighted mean of the (task) vectors of tensor {task.name} is zero "
                "(antipodal models with balancing weights); use different weights"
            )
        return mix(task.inputs, unit * (math.cos(eps) * float(weights @ n) / mean_norm), task, base=task.base)
