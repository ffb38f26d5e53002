"""Layer-wise hidden-state capture, one decoder block in memory at a time.

For every sample, each layer's hidden states are mean-pooled over the sample's real (non-padding)
tokens, giving [layers + 1, samples, hidden]: row 0 is the embedding output, row i the output of
block i, and the last row has the final norm applied (the convention of transformers'
`output_hidden_states`, so results match a whole-model forward pass).

Why layer by layer: a whole-model forward needs the whole model in device memory. Here each
block's weights are read from the memory-mapped checkpoint, every sample is pushed through the
block, the block is dropped, and only the activations stay. Peak memory is one block plus the
activations of all samples (plus the few embedding rows the samples use), whatever the depth, so
a 7B model's representations can be captured on a small GPU or CPU box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from ..errors import CheckpointError, ConfigError
from .models import DecoderSkeleton


class TensorSource(Protocol):
    """What capture needs from a checkpoint (fastmerge.io.checkpoint.Checkpoint provides it)."""

    path: Any

    def has(self, name: str) -> bool: ...

    def tensor(self, name: str) -> torch.Tensor: ...

    def release(self, name: str) -> None: ...


@dataclass
class Batch:
    """Right-padded token ids [B, T], the real-token mask [B, T] (bool) and the samples' indices."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    indices: list[int]


def tokenize_batches(tokenizer: Any, samples: Sequence[str], max_length: int, batch_size: int) -> list[Batch]:
    """Tokenize `samples` into batches of similar length (less padding, same pooled result)."""
    if max_length < 1 or batch_size < 1:
        raise ConfigError(f"max_length and batch_size must be positive, got {max_length} and {batch_size}")
    encoded = tokenizer(list(samples), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ConfigError(f"sample {i} ({samples[i]!r:.40}) has no tokens; remove it from the samples")
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in indices)
        input_ids = torch.full((len(indices), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.bool)
        for row, i in enumerate(indices):
            input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, : len(encoded[i])] = True
        batches.append(Batch(input_ids, mask, indices))
    return batches


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden [B, T, d] over the positions where mask [B, T] is true -> [B, d] (fp32)."""
    weights = mask.to(device=hidden.device, dtype=torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [B, 1, T, T]: causal, and padded keys hidden.

    With right padding every query row keeps at least its first key, so no row is fully masked
    (which would give NaN softmax rows that leak into the pooled padding-free mean).
    """
    width = mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
    allowed = causal.unsqueeze(0) & mask.unsqueeze(1)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias.unsqueeze(1)


def capture_representations(
    checkpoint: TensorSource,
    skeleton: DecoderSkeleton,
    batches: Sequence[Batch],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Mean-pooled hidden states [layers + 1, samples, hidden] (fp32, CPU) of one model."""
    device = torch.device(device)
    n_samples = sum(len(b.indices) for b in batches)
    out = torch.empty(skeleton.num_layers + 1, n_samples, skeleton.hidden_size, dtype=torch.float32)
    rotary = skeleton.rotary.to(device)
    masks = [b.mask.to(device) for b in batches]
    with torch.inference_mode():
        hidden = _embed(checkpoint, skeleton, batches, device)
        for b, batch in enumerate(batches):
            out[0, batch.indices] = masked_mean(hidden[b], masks[b]).cpu()
        positions = [torch.arange(m.shape[1], device=device).expand(m.shape) for m in masks]
        biases = [attention_bias(m, torch.float32) for m in masks]
        for i, layer in enumerate(skeleton.layers):
            layer_names = _materialize(layer, checkpoint, skeleton.layer_prefixes[i], device)
            last = i == skeleton.num_layers - 1
            if last:
                norm_names = _materialize(skeleton.norm, checkpoint, skeleton.norm_prefix, device)
            for b, batch in enumerate(batches):
                cos_sin = rotary(hidden[b], positions[b])
                hidden[b] = layer(hidden[b], attention_mask=biases[b], position_ids=positions[b], position_embeddings=cos_sin)
                pooled_input = skeleton.norm(hidden[b]) if last else hidden[b]
                out[i + 1, batch.indices] = masked_mean(pooled_input, masks[b]).cpu()
            _drop(layer, checkpoint, layer_names)
        _drop(skeleton.norm, checkpoint, norm_names)
    return out


def streamed_forward(checkpoint: TensorSource, skeleton: DecoderSkeleton, device: torch.device | str = "cpu",
                     **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The hidden states of `skeleton.base(**inputs, output_hidden_states=True)`, with the weights
    read from the checkpoint one module at a time: each module that holds weights gets them just
    before it runs and gives them back right after.

    Unlike `capture_representations`, this runs the model's own forward (its masks, rotary
    embedding and attention kernel) in the skeleton's dtype, so the hidden states are, bit for bit,
    those of the whole model loaded with transformers, while memory holds one weight matrix (a
    zero-copy view of the mapped file where dtype and device match) and the activations.
    """
    device = torch.device(device)
    skeleton.rotary.to(device)
    hooks = []
    for name, module in skeleton.base.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        prefix = f"{skeleton.base_prefix}{name}." if name else skeleton.base_prefix
        attached: list[str] = []

        def attach(module: torch.nn.Module, _args: Any, prefix: str = prefix, attached: list[str] = attached) -> None:
            attached[:] = _materialize(module, checkpoint, prefix, device, recurse=False)

        def detach(module: torch.nn.Module, _args: Any, _out: Any, attached: list[str] = attached) -> None:
            _drop(module, checkpoint, attached)

        hooks += [module.register_forward_pre_hook(attach), module.register_forward_hook(detach)]
    try:
        with torch.inference_mode():
            output = skeleton.base(**{k: v.to(device) for k, v in inputs.items()}, output_hidden_states=True,
                                   use_cache=False, return_dict=True)
    finally:
        for hook in hooks:
            hook.remove()
    return output.hidden_states


def _embed(checkpoint: TensorSource, skeleton: DecoderSkeleton, batches: Sequence[Batch], device: torch.device) -> list[torch.Tensor]:
    """Embedding output per batch, gathering only the rows the samples use from the mmap."""
    _require(checkpoint, [skeleton.embed_name])
    table = checkpoint.tensor(skeleton.embed_name)
    hidden = []
    for batch in batches:
        if int(batch.input_ids.max()) >= table.shape[0]:
            raise CheckpointError(
                f"token id {int(batch.input_ids.max())} is outside {skeleton.embed_name} ({table.shape[0]} rows) in "
                f"{checkpoint.path}; the new model's tokenizer does not fit this model"
            )
        hidden.append(table[batch.input_ids].to(device=device, dtype=torch.float32))
    checkpoint.release(skeleton.embed_name)
    return hidden


def _materialize(module: torch.nn.Module, checkpoint: TensorSource, prefix: str, device: torch.device,
                 recurse: bool = True) -> list[str]:
    """Give a meta-device module (only its own weights unless `recurse`) real storage on `device`
    from the checkpoint, in the module's dtype; returns the checkpoint names used.

    A checkpoint tensor already in that dtype and on that device is used as it is: a zero-copy
    view of the mapped file, whose pages `_drop` gives back.
    """
    slots = {key: t for key, t in module.state_dict(keep_vars=True).items() if recurse or "." not in key}
    names = {key: prefix + key for key in slots}
    _require(checkpoint, list(names.values()))
    module.load_state_dict({key: checkpoint.tensor(name).to(device=device, dtype=slots[key].dtype)
                            for key, name in names.items()}, strict=recurse, assign=True)
    return list(names.values())


def _drop(module: torch.nn.Module, checkpoint: TensorSource, names: Sequence[str]) -> None:
    """Free a module's storage by moving it back to the meta device, and drop the checkpoint
    pages it read from this process (they stay in the page cache)."""
    module.to("meta")
    for name in names:
        checkpoint.release(name)


def _require(checkpoint: TensorSource, names: Sequence[str]) -> None:
    missing = [name for name in names if not checkpoint.has(name)]
    if missing:
        raise CheckpointError(
            f"{checkpoint.path} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, "
            "which representation capture needs; is config.json the right architecture?"
        )
