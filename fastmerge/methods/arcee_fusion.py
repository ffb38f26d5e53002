"""arcee_fusion (mergekit 0.1.5 semantics): keep only the model's most important changes.

Per row (fibre along the last dimension), KL(p || q) between the softmaxes p of the model's row
and q of the base's row (each + 1e-8); importance = |x - b| * KL of the element's row. The
threshold is median + 1.5 * (q3 - q1) of all importances, with the quantile at q taken as the
sorted value at index floor(q * (n - 1)); elements at or above it take the model's value:
out = b + (x - b) * [importance >= threshold].

Deliberate difference: mergekit estimates the quantiles from a random sample (torch's global
RNG, unseeded) once a tensor has more than 10^6 elements; fastmerge always uses the exact
order statistics (k-th smallest selection, no sort), so the result is deterministic and equals
mergekit's exactly wherever mergekit does not sample.
"""

from __future__ import annotations

import torch

from .base import TensorTask, register
from .contract import ContractMethod

SOFTMAX_EPS = 1e-8


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - b| times the KL divergence of the element's row (fp32)."""
    p = torch.softmax(x, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + SOFTMAX_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (x - base).abs() * kl


def fusion_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 * IQR, each quantile the element at sorted index floor(q * (n - 1))."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1

    def order_statistic(index: int) -> torch.Tensor:
        return flat.kthvalue(index + 1).values

    q1, median, q3 = (order_statistic(i) for i in (last // 4, last // 2, (3 * last) // 4))
    return median + 1.5 * (q3 - q1)


@register
class ArceeFusion(ContractMethod):
    """Base + one model; no parameters."""

    name = "arcee_fusion"
    requires_base = True
    min_inputs = max_inputs = 1

    def merge(self, task: TensorTask) -> torch.Tensor:
        base, x = task.base.float(), task.inputs[0].float()
        if x.numel() == 0:
            return x.to(task.out_dtype)
        scores = importance(x, base)
        mask = (scores >= fusion_threshold(scores)).float()
        return (base + (x - base) * mask).to(task.out_dtype)
