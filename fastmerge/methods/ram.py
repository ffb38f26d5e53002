"""ram and ramplus_tl: Reinforced Agent Merging (arXiv:2601.13572; mergekit 0.1.5 semantics).

Task vectors d_i = x_i - b; element j of d_i "contributes" when |d_ij| > epsilon. An element
changed by exactly one model takes that model's change (ramplus_tl scales it by lambda_i); an
element changed by several takes the mean of their changes; untouched elements keep the base:

    out = b + sum_i d_i [contributes_ij] ([unique_j] lambda_i + [shared_j] / count_j)

ram has lambda_i = 1. ramplus_tl ("tensor-local") boosts models whose changes are mostly shared:
rho_i = (#shared elements model i changes) / max(#unique elements it changes, epsilon),
lambda_i = 1 + r * clamp(rho_i, 0, alpha), counted per tensor.
"""

from __future__ import annotations

import torch

from .base import TensorTask, register
from .contract import ContractMethod


def ram_merge(task: TensorTask, r: float | None = None, alpha: float | None = None) -> torch.Tensor:
    """The RAM merge of `task`; with r and alpha the RAM+ (tensor-local) rescaling."""
    epsilon = float(task.global_params["epsilon"])
    base = task.base.float()
    if not task.inputs:
        return base.to(task.out_dtype)
    deltas = torch.stack([x.float().reshape(-1) - base.reshape(-1) for x in task.inputs])
    contributes = deltas.abs() > epsilon
    counts = contributes.sum(dim=0, keepdim=True)
    shared, unique = counts > 1, counts == 1
    if r is None:
        lambdas = torch.ones((len(task.inputs), 1), dtype=torch.float32, device=base.device)
    else:
        rho = (contributes & shared).sum(dim=1) / (contributes & unique).sum(dim=1).clamp(min=epsilon)
        lambdas = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    kept = deltas * contributes
    merged = (kept * unique * lambdas + kept * shared / counts.clamp(min=1)).sum(dim=0)
    return (base + merged.reshape(base.shape)).to(task.out_dtype)


@register
class Ram(ContractMethod):
    """Base + any number of models; `epsilon` (default 1e-5) is the 'changed' threshold."""

    name = "ram"
    global_params = {"epsilon": 1e-5}
    global_bounds = {"epsilon": (0.0, None, False)}
    requires_base = True
    min_inputs = 0

    def merge(self, task: TensorTask) -> torch.Tensor:
        return ram_merge(task)


@register
class RamPlusTL(ContractMethod):
    """RAM with the tensor-local RAM+ rescaling of unique changes (`r` 0.1, `alpha` 0.2)."""

    name = "ramplus_tl"
    global_params = {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    global_bounds = {"r": (0.0, None, False), "alpha": (0.0, None, False), "epsilon": (0.0, None, False)}
    requires_base = True
    min_inputs = 0

    def merge(self, task: TensorTask) -> torch.Tensor:
        return ram_merge(task, r=float(task.global_params["r"]), alpha=float(task.global_params["alpha"]))
