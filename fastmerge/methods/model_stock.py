"""model_stock (Model Stock, arXiv:2403.19522; mergekit 0.1.5 semantics).

With task vectors d_i = x_i - b of N >= 2 fine-tunes, c is the mean pairwise cosine of the d_i
(each pair's cosine divides by max(|d_i| |d_j|, 1e-6) and is clamped to [-1, 1]),
t = N c / (1 + (N - 1) c), and the output is t * mean(x_i) + (1 - t) * b. Where the denominator
vanishes (|1 + (N-1) c| < 1e-6) t = 0: there is no finite estimate, so the base is kept.
`filter_wise` computes c and t for every row (fibre along the last dimension) separately.
"""

from __future__ import annotations

import torch

from .base import TensorTask, register
from .contract import ContractMethod
from .geometry import gram, mix, norms

NORM_PRODUCT_MIN = 1e-6
SINGULAR = 1e-6


def stock_ratio(g: torch.Tensor) -> torch.Tensor:
    """t per fibre [R] from the task vectors' Gram matrix [N, N, R]."""
    count = g.shape[0]
    n = norms(g)
    pairs = torch.triu_indices(count, count, offset=1)
    cos = (g[pairs[0], pairs[1]] / (n[pairs[0]] * n[pairs[1]]).clamp(min=NORM_PRODUCT_MIN)).clamp(-1, 1)
    c = cos.mean(dim=0)
    denominator = 1 + (count - 1) * c
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(c), count * c / torch.where(singular, torch.ones_like(c), denominator))


@register
class ModelStock(ContractMethod):
    """t * mean(x_i) + (1 - t) * b with t from the task vectors' mean pairwise cosine."""

    name = "model_stock"
    global_params = {"filter_wise": False}
    requires_base = True
    min_inputs = 2

    def merge(self, task: TensorTask) -> torch.Tensor:
        dim = -1 if task.global_params["filter_wise"] else None
        t = stock_ratio(gram(task.inputs, base=task.base, dim=dim))
        count = len(task.inputs)
        coefficients = torch.cat([(t / count).expand(count, -1), (1 - t).unsqueeze(0)])
        return mix([*task.inputs, task.base], coefficients, task, dim=dim)
