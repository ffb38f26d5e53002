"""nearswap (mergekit 0.1.5 semantics): take the model's value where it is near the base.

Per element, w = clamp(t / max(|b - x|, 1e-6), 0, 1) and the output is w x + (1 - w) b: where
the model differs from the base by at most t it replaces the base outright, farther away it
moves the base only by t towards the model.
"""

from __future__ import annotations

import torch

from .base import TensorTask, register
from .contract import ContractMethod

MIN_DISTANCE = 1e-6


@register
class NearSwap(ContractMethod):
    """Base + one model, method-level `t` (required)."""

    name = "nearswap"
    global_params = {"t": None}
    required_global_params = ("t",)
    requires_base = True
    min_inputs = max_inputs = 1

    def merge(self, task: TensorTask) -> torch.Tensor:
        t = float(task.global_params["t"])
        base, x = task.base.float(), task.inputs[0].float()
        weight = (t / (base - x).abs().clamp(min=MIN_DISTANCE)).clamp(0, 1)
        return (weight * x + (1 - weight) * base).to(task.out_dtype)
