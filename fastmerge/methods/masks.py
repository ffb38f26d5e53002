"""Sparse masks inside merges: `parameters: {mask: PATH}` on a model and a top-level `output_mask`.

- A model's mask keeps only the masked entries of its task vector: x_i becomes
  b + mask * (x_i - b), i.e. x_i where kept and b elsewhere (without a base: mask * x_i), before the method sees it, so any merge
  method can combine pruned task vectors.
- `output_mask` zeroes the merged tensor where the mask drops, keeping a pruned model sparse
  after merging into it.

Tensors a mask file does not list pass through unchanged. Mask files are loaded once per merge
(`MaskCache`) and checked against the tensor they are applied to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..ops import apply_mask
from ..pruning.mask_file import MaskSet, load_masks
from .base import TensorTask


def mask_file_setting(value: Any, setting: str = "parameter `mask`") -> str:
    """The mask file a `mask` (or `output_mask`) setting names, checked before it is used as a path.

    Only a non-empty string is a path: a number would fail deep inside pathlib, and an empty
    string would read as "no mask" and merge unmasked without a word.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{setting} must be the path of a masks.safetensors file (from fastmerge prune), got {value!r}")
    return value


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
    """Dropped entries become the base's value (a zero task vector) or 0. Selecting, rather than
    computing b + mask * (x - b), keeps kept entries bit-exact: fp32 b + (x - b) need not be x."""
    masks.check_tensor(name, x.shape)
    if base is None:
        return apply_mask(x, masks.packed[name].to(x.device), 1.0)
    return torch.where(masks.dense(name).to(x.device), x, base.to(x.dtype))


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
