"""passthrough: copy one model's tensor, optionally times a per-model `scale`.

With `slices` this is how layer-stacking merges ("frankenmerges") are written: each slice
names one source and a `layer_range`, and the planner renumbers the output layers. Without a
scale the bytes are copied as they are (converted only if the output dtype differs).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from .base import TensorTask, register
from .contract import ContractMethod, check_number


@register
class Passthrough(ContractMethod):
    """One model per slice; `scale` (per model, default none) multiplies its tensors."""

    name = "passthrough"
    model_params = {"scale": None}
    uses_base = False
    min_inputs = max_inputs = 1

    def check_scales(self, tensor: str, params: list[dict[str, Any]]) -> None:
        for p in params:
            if p["scale"] is not None:
                check_number("scale", p["scale"], tensor)

    def prepare(self, context: Any) -> None:
        super().prepare(context)
        for tensor in context.plan.tensors:
            self.check_scales(tensor.name, tensor.params)

    def merge(self, task: TensorTask) -> torch.Tensor:
        self.check_scales(task.name, task.params)
        scale = task.params[0]["scale"]
        if scale is None:
            return task.inputs[0].to(task.out_dtype)
        return ops.blend(task.inputs, [float(scale)], out_dtype=task.out_dtype, backend=task.backend)
