"""karcher: the Riemannian (Karcher) mean of the models' directions on the unit sphere, scaled
by their mean norm (mergekit 0.1.5 semantics: equal weights, `max_iter` 10, `tol` 1e-5).

mergekit iterates on full-size tensors. Every iterate is a combination of the unit vectors
u_i = x_i / |x_i| (the start is their normalised mean; each step adds a tangent vector built
from the u_i and the current mean), so the whole iteration runs on the coefficient vector c of
mean = sum_j c_j u_j, with <mean, u_i> = (Gu c)_i and |mean|^2 = c^T Gu c from the fp64 Gram
matrix Gu of the unit vectors. The tensors are read twice (Gram, final mix) whatever
`max_iter` is, and the iteration itself is exact fp64 arithmetic on K numbers.
"""

from __future__ import annotations

import math

import torch

from .base import TensorTask, register
from .contract import ContractMethod
from .geometry import gram, mix, norms


def karcher_coefficients(g: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Coefficients a with karcher mean = sum_i a_i x_i, from the fp64 Gram matrix G of the x_i.

    Equal weights 1/K. Models with norm <= tol take no part in the direction (their weight is
    shared out among the others) but still count in the mean norm, as in mergekit.
    """
    count = g.shape[0]
    n = norms(g.unsqueeze(-1))[:, 0]
    valid = n > tol
    result = torch.zeros(count, dtype=torch.float64)
    if not bool(valid.any()):
        return result
    alpha = torch.full((count,), 1.0 / count, dtype=torch.float64)
    n_valid = n[valid]
    unit_gram = g[valid][:, valid] / torch.outer(n_valid, n_valid)
    weights = alpha[valid] / alpha[valid].sum()

    def length(c: torch.Tensor) -> float:
        return math.sqrt(max(0.0, float(c @ unit_gram @ c)))

    mean = weights.clone()
    if length(mean) < tol:
        mean = torch.zeros_like(weights)
        mean[0] = 1.0
    else:
        mean = mean / length(mean)
    for _ in range(max_iter):
        dots = (unit_gram @ mean).clamp(-1, 1)
        theta = torch.acos(dots)
        moving = theta >= tol
        safe_theta = torch.where(moving, theta, torch.ones_like(theta))
        scale = torch.where(moving, weights * theta / torch.sin(safe_theta), torch.zeros_like(theta))
        # tangent = sum_i scale_i (u_i - dot_i mean)
        tangent = scale - (scale * dots).sum() * mean
        tangent_norm = length(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        mean_norm = length(mean)
        if mean_norm > tol:
            mean = mean / mean_norm
    mean_norm_of_models = float((alpha * n).sum())
    result[valid] = mean_norm_of_models * mean / n_valid
    return result


@register
class Karcher(ContractMethod):
    """Karcher mean of all the listed models (weights and the base's role are ignored)."""

    name = "karcher"
    global_params = {"max_iter": 10, "tol": 1e-5}
    global_bounds = {"max_iter": (0, None, True), "tol": (0.0, None, False)}
    uses_base = False

    def merge(self, task: TensorTask) -> torch.Tensor:
        if len(task.inputs) == 1:
            return task.inputs[0].to(task.out_dtype)
        g = gram(task.inputs)[:, :, 0].cpu()
        coefficients = karcher_coefficients(g, int(task.global_params["max_iter"]), float(task.global_params["tol"]))
        return mix(task.inputs, coefficients, task)
