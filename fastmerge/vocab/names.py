"""Which tensors are indexed by token (and so follow the tokenizer), told from their names.

Hugging Face causal LMs name their input embedding `embed_tokens` (Llama, Mistral, Qwen, Gemma,
Phi-3, Mixtral), `wte` (GPT-2 style), `word_embeddings` (BLOOM, Falcon) or `tok_embeddings`
(InternLM), and their output embedding `lm_head` (or `embed_out`, GPT-NeoX). One pattern for
each covers these families without a per-architecture table. Position embeddings (`wpe`,
`embed_positions`) are not token-indexed and do not match.
"""

from __future__ import annotations

import re
from typing import Iterable

_INPUT_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings)\.weight$")
_OUTPUT_EMBEDDING = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.(?:weight|bias)$")


def is_input_embedding(name: str) -> bool:
    return _INPUT_EMBEDDING.search(name) is not None


def is_output_embedding(name: str) -> bool:
    return _OUTPUT_EMBEDDING.search(name) is not None


def is_vocabulary_tensor(name: str) -> bool:
    """Token-indexed along axis 0: embedding matrices and output biases."""
    return is_input_embedding(name) or is_output_embedding(name)


def tied_source(name: str, names: Iterable[str]) -> str | None:
    """The tensor a model with tied embeddings (`tie_word_embeddings`, no `lm_head.weight` of
    its own) uses as its output embedding: its input embedding. None for any other tensor,
    or when the model has no single input embedding."""
    if not (is_output_embedding(name) and name.endswith(".weight")):
        return None
    candidates = [n for n in names if is_input_embedding(n)]
    return candidates[0] if len(candidates) == 1 else None
