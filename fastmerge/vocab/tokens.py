"""mergekit's `tokenizer:` block: the output vocabulary's source plus per-token embeddings and
padding.

    tokenizer:
      source: union                 # union (the default) | base | a model path
      pad_to_multiple_of: 64        # embedding rows padded up to a multiple (optional)
      tokens:                       # per output token (a token not in the vocabulary is added)
        <|im_start|>:
          source: /models/chat      # that model's row for the token
          force: true               # in every model, not only in those that lack the token
        <|im_end|>:
          source: {kind: model_token, model: /models/base, token: "</s>"}   # or token_id: 2
        <|pad|>:
          source: {kind: zero}

The rules are mergekit 0.1.5's. A model that has a token keeps its own row unless the token is
`force`d; a model that lacks it (every model, when forced) gets the row the token's `source`
names: the source model's row for that token, a given row of the source model (`model_token`,
by id or by the token's id in that model's own tokenizer), or zeros. Tokens without a config
keep the `tokenizer_source` rules (vocab/align.py). Padding rows of each model are the mean of
its aligned rows (fp32, rounded once), and config.json's vocab_size is the padded size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..values import is_integer

ZERO, MODEL, MODEL_TOKEN = "zero", "model", "model_token"


@dataclass(frozen=True)
class TokenEmbedding:
    """Where one output token's row comes from (see the module docstring)."""

    kind: str  # ZERO, MODEL or MODEL_TOKEN
    model: str | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerBlock:
    """A parsed `tokenizer:` block."""

    source: str
    tokens: dict[str, TokenEmbedding] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def parse_tokenizer_block(value: Any) -> TokenizerBlock:
    if not isinstance(value, dict):
        raise ConfigError("`tokenizer` must be a mapping with `source`, `tokens` and/or `pad_to_multiple_of`")
    unknown = sorted(set(value) - {"source", "tokens", "pad_to_multiple_of"})
    if unknown:
        raise ConfigError(f"`tokenizer.{unknown[0]}` is not a tokenizer option (source, tokens, pad_to_multiple_of)")
    source = value.get("source", "union")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError("`tokenizer.source` must be `union`, `base` or a model path")
    pad = value.get("pad_to_multiple_of")
    if pad is not None and (not is_integer(pad) or pad < 1):
        raise ConfigError(f"`tokenizer.pad_to_multiple_of` must be a positive integer, got {pad!r}")
    tokens = value.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ConfigError("`tokenizer.tokens` must map tokens to {source, force}")
    return TokenizerBlock(source, {str(token): _parse_token(str(token), cfg) for token, cfg in tokens.items()}, pad)


def _parse_token(token: str, cfg: Any) -> TokenEmbedding:
    where = f"`tokenizer.tokens[{token!r}]`"
    if not isinstance(cfg, dict) or set(cfg) - {"source", "force"}:
        raise ConfigError(f"{where} must be a mapping with `source` and optionally `force`")
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{where}.force must be true or false, got {force!r}")
    source = cfg.get("source")
    if isinstance(source, str) and source.strip():
        return TokenEmbedding(MODEL, model=source, force=force)
    if not isinstance(source, dict) or source.get("kind") not in (ZERO, MODEL_TOKEN):
        raise ConfigError(f"{where}.source must be a model path, {{kind: zero}} or "
                          "{kind: model_token, model: PATH, token_id: N | token: TEXT}")
    if source["kind"] == ZERO:
        if set(source) != {"kind"}:
            raise ConfigError(f"{where}.source: `kind: zero` takes no other keys")
        return TokenEmbedding(ZERO, force=force)
    if set(source) - {"kind", "model", "token_id", "token"}:
        raise ConfigError(f"{where}.source: model_token takes model and one of token_id / token")
    model, token_id, text = source.get("model"), source.get("token_id"), source.get("token")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"{where}.source: model_token needs `model`, a model path")
    if (token_id is None) == (text is None):
        raise ConfigError(f"{where}.source: model_token needs exactly one of token_id and token")
    if token_id is not None and (not is_integer(token_id) or token_id < 0):
        raise ConfigError(f"{where}.source.token_id must be an integer >= 0, got {token_id!r}")
    if text is not None and not isinstance(text, str):
        raise ConfigError(f"{where}.source.token must be a string, got {text!r}")
    return TokenEmbedding(MODEL_TOKEN, model=model, token_id=token_id, token=text, force=force)


def padded_size(size: int, multiple: int | None) -> int:
    """`size` rounded up to a multiple of `multiple` (unchanged without one)."""
    return -(-size // multiple) * multiple if multiple else size
