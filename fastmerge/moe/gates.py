"""Router initialisation for a MoE built from dense models: one vector per layer and expert.

A token goes to the experts whose router vectors best match its hidden state, so each expert's
vector is made to point where the hidden states of its prompts point (mergekit-moe's gate modes,
computed the same way, so a config gives the same routers as mergekit's):

  hidden, hidden_last  the base model's hidden state before each layer at each prompt's last
                       token, averaged over the prompts (bf16, as mergekit runs the model);
  hidden_avg           the same averaged over each prompt's tokens first;
  cheap_embed          the unit vector along the sum of the prompts' token embeddings, the same
                       for every layer;
  random               standard normal; uniform_random: U(-1/sqrt(hidden), 1/sqrt(hidden)), what
                       torch.nn.Linear starts from. Drawn from torch's generator seeded with
                       `seed`, which draws what mergekit draws under --random-seed.

Negative prompts' vector is subtracted from the positive one, and each vector is scaled to unit
length. Prompt modes tokenize `bos_token + prompt`, padded on the left.

The hidden-state modes run transformers' own forward of the base model, bit for bit what
mergekit's whole-model forward computes, but with the weights attached from the mapped file one
module at a time (representations.capture.streamed_forward): one weight matrix in memory
instead of the whole model, and a `model+adapter` base runs with its LoRA applied.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch

from ..errors import CheckpointError
from ..io.checkpoint import Checkpoint
from ..representations.capture import streamed_forward
from ..representations.models import DecoderSkeleton, build_skeleton, open_tokenizer, require_transformers
from .config import Expert

EMBED_NAME = "model.embed_tokens.weight"
# mergekit warns where a layer's router matrix is this ill-conditioned.
DEGENERATE_CONDITION = 5.0


def router_vectors(gate_mode: str, experts: list[Expert], base: Checkpoint, layers: int, hidden_size: int,
                   generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(layers, experts, hidden_size) router vectors for `gate_mode`, one per expert in order."""
    shape = (layers, len(experts), hidden_size)
    if gate_mode == "random":
        return torch.randn(shape, generator=generator)
    if gate_mode == "uniform_random":
        bound = math.sqrt(1.0 / hidden_size)
        return torch.rand(shape, generator=generator) * 2 * bound - bound
    tokenizer = _tokenizer(base)
    if gate_mode == "cheap_embed":
        embed = _embeddings(base)

        def vector(prompts: tuple[str, ...]) -> torch.Tensor:
            return _embedding_sum(embed, _tokenize(tokenizer, prompts)).repeat(layers, 1)
    else:
        skeleton = _skeleton(base)

        def vector(prompts: tuple[str, ...]) -> torch.Tensor:
            return _hidden_states(base, skeleton, _tokenize(tokenizer, prompts), gate_mode == "hidden_avg", device)
    # Experts often share a prompt set (the same negative prompts, say): each set runs the model once.
    vector = functools.cache(vector)
    return torch.stack([_expert_vector(vector, e.positive_prompts, e.negative_prompts) for e in experts]).permute(1, 0, 2).cpu()


def degenerate_layers(routers: torch.Tensor) -> list[int]:
    """Layers whose router matrix is ill-conditioned: some experts' vectors nearly coincide (or
    are combinations of others), so the router can barely tell those experts apart."""
    return [i for i in range(routers.shape[0]) if torch.linalg.cond(routers[i].float()) > DEGENERATE_CONDITION]


def _expert_vector(vector: Callable[[tuple[str, ...]], torch.Tensor], positive: tuple[str, ...],
                   negative: tuple[str, ...]) -> torch.Tensor:
    """The unit vector along `vector(positive) - vector(negative)` (computed out of place: `vector`
    caches its results)."""
    v = vector(positive)
    if negative:
        v = v - vector(negative)
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def _tokenizer(base: Checkpoint) -> Any:
    if base.directory is None:
        raise CheckpointError(f"{base.path}: the prompt gate modes need the base model as a directory with its tokenizer")
    tokenizer = open_tokenizer(base.directory, "MoE gate modes that read prompts",
                               "the prompt gate modes tokenize the prompts with the base model's tokenizer")
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenize(tokenizer: Any, prompts: tuple[str, ...]) -> Any:
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def _embeddings(base: Checkpoint) -> torch.Tensor:
    if not base.has(EMBED_NAME):
        raise CheckpointError(f"{base.path}: no tensor {EMBED_NAME!r}, which gate_mode cheap_embed reads")
    return base.tensor(EMBED_NAME).float()


def _embedding_sum(embed: torch.Tensor, tokenized: Any) -> torch.Tensor:
    """(1, hidden) unit vector along the sum of the prompts' token embeddings (padding masked)."""
    ids = tokenized["input_ids"]
    if ids.numel() and int(ids.max()) >= embed.shape[0]:
        raise CheckpointError(f"the tokenizer gives token id {int(ids.max())}, beyond the {embed.shape[0]} rows of "
                              f"{EMBED_NAME}")
    h = embed[ids]  # the rows a one-hot product picks, exactly
    summed = (h * tokenized["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _skeleton(base: Checkpoint) -> DecoderSkeleton:
    """The base model's bf16 skeleton (mergekit runs the model in bf16), weights left in the file."""
    require_transformers("MoE gate modes hidden, hidden_avg and hidden_last")
    config = base.required_config("the hidden-state gate modes run the base model as it describes")
    return build_skeleton(config, base.path, dtype=torch.bfloat16)


def _hidden_states(base: Checkpoint, skeleton: DecoderSkeleton, tokenized: Any, average: bool,
                   device: torch.device) -> torch.Tensor:
    """(layers, hidden): each layer's input hidden state at the last token (or averaged over the
    tokens, padding included as mergekit does), averaged over the prompts."""
    hidden = streamed_forward(base, skeleton, device, **tokenized)
    states = torch.stack(hidden[:-1])  # (layers, prompts, tokens, hidden)
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]
