"""Training objectives whose gradients the statistics pass measures.

- causal_lm: mean next-token cross-entropy over the non-padding tokens of each text.
- contrastive: InfoNCE for embedding models: queries against the batch's positives (and any
  hard negatives), cosine similarity / temperature, the matching positive as the target;
  embeddings are mean-pooled over tokens or taken at the last non-padding token.

Each objective turns a batch of raw examples into a loss, or None when the batch has nothing to
learn from (every token padding, a single candidate), so the statistics pass can skip it and
fail clearly if no batch at all carries a gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .data import Pair


def _tokenize(tokenizer: Any, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def causal_lm_loss(model: Any, tokenizer: Any, texts: list[str], max_length: int, device: torch.device) -> torch.Tensor | None:
    """Mean next-token loss over the batch's real tokens; None if no token has a successor."""
    inputs = _tokenize(tokenizer, texts, max_length, device)
    labels = inputs["input_ids"].clone()
    padding = inputs["attention_mask"] == 0
    pad_id = tokenizer.pad_token_id
    if pad_id is not None and pad_id != tokenizer.eos_token_id:
        padding |= inputs["input_ids"] == pad_id
    labels[padding] = -100
    if not bool((labels[:, 1:] != -100).any()):
        return None
    inputs.pop("token_type_ids", None)
    return model(**inputs, labels=labels).loss


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    last = mask.sum(1).clamp(min=1) - 1  # right padding: the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def embed(model: Any, tokenizer: Any, texts: list[str], max_length: int, pooling: str, device: torch.device) -> torch.Tensor:
    """Unit-norm sentence embeddings (fp32) of `texts`."""
    inputs = _tokenize(tokenizer, texts, max_length, device)
    hidden = model(**inputs).last_hidden_state
    return F.normalize(_pool(hidden, inputs["attention_mask"], pooling).float(), dim=-1)


def contrastive_loss(model: Any, tokenizer: Any, pairs: list[Pair], max_length: int, device: torch.device,
                     pooling: str, temperature: float) -> torch.Tensor | None:
    """InfoNCE of queries over [positives; hard negatives]; None with fewer than 2 candidates."""
    passages = [p.positive for p in pairs] + [n for p in pairs for n in p.negatives]
    if len(passages) < 2:
        return None
    queries = embed(model, tokenizer, [p.query for p in pairs], max_length, pooling, device)
    candidates = embed(model, tokenizer, passages, max_length, pooling, device)
    logits = queries @ candidates.T / temperature
    return F.cross_entropy(logits, torch.arange(len(pairs), device=device))
