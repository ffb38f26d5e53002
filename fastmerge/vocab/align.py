"""Put every model's token-indexed tensor (embeddings, lm_head) in the output vocabulary's
order before the merge method sees it.

A model that has an output token contributes its own row. For a model that lacks it, the row
is filled the way mergekit 0.1.5 fills it, so the method blends something sensible:
the base model's row if the base has the token; else the row of the only model that has it;
else the mean of the rows of the models that have it (in fp32, rounded once); zero when no
model has it. "Models" are the tensor's merge inputs plus the base when the method uses one,
exactly the group mergekit aligns. The `tokenizer:` block's per-token sources and padding
(vocab/tokens.py) are applied after that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..methods.base import TensorTask


@dataclass(frozen=True)
class RowOverride:
    """A `tokenizer.tokens` entry resolved for one tensor (vocab/tokens.py): output row `row` of
    every model that lacks the token (every model with `force`) becomes row `source_row` of
    group member `source` as read (inputs, then the base), or zeros when `source` is None."""

    row: int
    force: bool
    source: int | None = None
    source_row: int = 0


@dataclass(frozen=True)
class VocabularyAlignment:
    """For one output tensor: which source row each output token takes, per input and for the
    base (-1: the model lacks the token), the per-token overrides, and the padded row count."""

    input_rows: tuple[torch.Tensor, ...]
    base_rows: torch.Tensor | None
    overrides: tuple[RowOverride, ...] = ()
    padded_size: int | None = None

    def align(self, task: TensorTask) -> TensorTask:
        tensors = list(task.inputs) + ([task.base] if task.base is not None else [])
        rows = list(self.input_rows) + ([self.base_rows] if task.base is not None else [])
        aligned = align_rows(tensors, rows, base_index=len(task.inputs) if task.base is not None else None)
        override_rows(aligned, tensors, rows, self.overrides)
        if self.padded_size is not None:
            aligned = [pad_rows(tensor, self.padded_size) for tensor in aligned]
        count = len(task.inputs)
        return replace(task, inputs=aligned[:count], base=aligned[count] if task.base is not None else None)


def override_rows(aligned: list[torch.Tensor], originals: list[torch.Tensor], rows: list[torch.Tensor],
                  overrides: tuple[RowOverride, ...]) -> None:
    """Apply the per-token overrides to the aligned tensors in place."""
    for override in overrides:
        target = aligned[0][override.row]
        value = torch.zeros_like(target) if override.source is None else originals[override.source][override.source_row].to(target)
        for tensor, model_rows in zip(aligned, rows):
            if override.force or model_rows[override.row] < 0:
                tensor[override.row] = value


def pad_rows(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor` with rows added up to `size`, each the mean of its rows (mergekit's padding),
    summed in fp32 and rounded once."""
    if size == tensor.shape[0]:
        return tensor
    padded = tensor.new_empty((size, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    padded[tensor.shape[0]:] = tensor.float().mean(dim=0).to(tensor.dtype)
    return padded


def align_rows(tensors: list[torch.Tensor], rows: list[torch.Tensor], base_index: int | None) -> list[torch.Tensor]:
    """Re-index each tensor's axis 0 by its `rows` and fill the missing rows (see the module doc).
    The results share one dtype, the promotion of the inputs' (mergekit's choice)."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    device = tensors[0].device
    rows = [r.to(device) for r in rows]
    aligned = [t.index_select(0, r.clamp(min=0)).to(dtype) for t, r in zip(tensors, rows)]
    present = torch.stack([r >= 0 for r in rows])
    incomplete = (~present.all(dim=0)).nonzero().flatten()
    if incomplete.numel() == 0:
        return aligned
    has = present[:, incomplete]
    extra = (1,) * (tensors[0].dim() - 1)
    total = torch.zeros((incomplete.numel(), *tensors[0].shape[1:]), dtype=torch.float32, device=device)
    for model, tensor in enumerate(aligned):
        total += torch.where(has[model].view(-1, *extra), tensor[incomplete].float(), 0.0)
    fill = total / has.sum(dim=0).clamp(min=1).view(-1, *extra)
    if base_index is not None:
        from_base = has[base_index]
        fill[from_base] = aligned[base_index][incomplete[from_base]].float()
    fill = fill.to(dtype)
    for model, tensor in enumerate(aligned):
        missing = ~has[model]
        tensor[incomplete[missing]] = fill[missing]
    return aligned
