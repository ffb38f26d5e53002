"""linear and task_arithmetic: weighted sums on the fused blend kernel.

Normalisation is folded into the weights (w_i / sum w, computed in fp64, rounded to fp32 by the
kernel), so both methods are a single pass of `ops.blend` with the DESIGN.md arithmetic:
linear `acc = fma(w_i, x_i, acc)`; task_arithmetic `acc = fma(w_i, x_i - b, acc)`,
`out = fma(lambda, acc, b)`.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from ..errors import ConfigError
from .base import MergeMethod, TensorTask, register


def normalized(weights: list[float], tensor: str, allow_zero_sum: bool) -> list[float]:
    """w_i / sum(w). A zero sum is an error for linear (nothing to average) and leaves the
    weights as they are for task vectors (METHODS.md: div 0 -> 1)."""
    total = sum(weights)
    if total == 0:
        if allow_zero_sum:
            return list(weights)
        raise ConfigError(f"the weights for tensor {tensor} sum to 0, so `normalize: true` cannot divide by them")
    return [w / total for w in weights]


@register
class Linear(MergeMethod):
    """sum(w_i x_i) / sum(w_i) (normalize, default) or sum(w_i x_i)."""

    name = "linear"
    required_model_params = ("weight",)
    global_params = {"normalize": True}
    uses_base = False

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        weights = [float(p["weight"]) for p in task.params]
        if task.global_params["normalize"]:
            weights = normalized(weights, task.name, allow_zero_sum=False)
        return ops.blend(task.inputs, weights, out_dtype=task.out_dtype, backend=task.backend)


@register
class TaskArithmetic(MergeMethod):
    """b + lambda * sum_i w_i (x_i - b), optionally divided by sum(w_i)."""

    name = "task_arithmetic"
    required_model_params = ("weight",)
    # density, rescale and int8_mask: mergekit 0.1.5 declares them for task_arithmetic (its task
    # vector family's shared parameters) and never uses them, as it does not sparsify; accepted
    # so its configs run, and noted where they would change something elsewhere.
    model_params = {"density": 1.0}
    global_params = {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False}
    requires_base = True

    def prepare(self, context: Any) -> None:
        tensors = context.plan.tensors
        ignored = [name for name, given in (("density", any(p["density"] != 1.0 for t in tensors for p in t.params)),
                                            ("rescale", any(t.global_params["rescale"] for t in tensors))) if given]
        if ignored:
            context.plan.notes.append(f"task_arithmetic does not sparsify, so {' and '.join(ignored)} had no effect, as in "
                                      "mergekit; ties, dare_linear or breadcrumbs trim task vectors")

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        weights = [float(p["weight"]) for p in task.params]
        if task.global_params["normalize"]:
            weights = normalized(weights, task.name, allow_zero_sum=True)
        lam = float(task.global_params["lambda"])
        if not task.inputs:
            return task.base.to(task.out_dtype)
        return ops.blend(task.inputs, weights, base=task.base, lam=lam, out_dtype=task.out_dtype, backend=task.backend)
