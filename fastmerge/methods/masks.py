"""Sparse masks inside merges: `parameters: {mask: PATH}` on a model and a top-level `output_mask`.

- A model's mask keeps only the masked entries of its task vector: x_i becomes
  b + mask * (x_i - b) (without a base: mask * x_i), before the method sees it, so any merge
  method can combine pruned task vectors.
- `output_mask` zeroes the merged tensor where the mask drops, keeping a pruned model sparse
  after merging into it.

Tensors a mask file does not list pass through unchanged. Mask files are loaded once per merge
(`MaskCache`) and checked against the tensor they are applied to.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..ops import apply_mask
from ..pruning.mask_file import MaskSet, load_masks
from .base import TensorTask


class MaskCache:
    """Mask files by path, each read once per merge."""

    def __init__(self) -> None:
        self._sets: dict[str, MaskSet] = {}

    def get(self, path: str | Path) -> MaskSet:
        key = str(path)
        if key not in self._sets:
            self._sets[key] = load_masks(path)
        return self._sets[key]


def _masked(x: torch.Tensor, masks: MaskSet, name: str, base: torch.Tensor | None) -> torch.Tensor:
    masks.check_tensor(name, x.shape)
    packed = masks.packed[name].to(x.device)
    if base is None:
        return apply_mask(x, packed, 1.0)
    delta = apply_mask(x.float() - base.float(), packed, 1.0)
    return (base.float() + delta).to(x.dtype)


def masked_inputs(task: TensorTask, masks: list[MaskSet | None]) -> TensorTask:
    """`task` with each input's task vector masked by its model's MaskSet (None: unmasked)."""
    inputs = [
        x if m is None or task.name not in m.packed else _masked(x, m, task.name, task.base)
        for x, m in zip(task.inputs, masks)
    ]
    return TensorTask(**{**task.__dict__, "inputs": inputs})


def mask_output(name: str, merged: torch.Tensor, masks: MaskSet) -> torch.Tensor:
    """The merged tensor with `output_mask` applied (unchanged if the file does not list it)."""
    if name not in masks.packed:
        return merged
    return _masked(merged, masks, name, None)
