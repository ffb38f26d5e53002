"""The output vocabulary of a merge (`tokenizer_source`) and where each model's rows go in it.

The rules are mergekit 0.1.5's, so a config means the same thing in both tools:
- `base`: the base model's tokenizer (the first model's when there is no base);
- `model:<path>` (or a bare model path, as mergekit writes it): that model's tokenizer;
- `union`: the base tokenizer plus every token another model has that it lacks; ordinary
  tokens are appended first, then added (special) tokens, each once, first model wins.
  fastmerge appends them in each model's token-id order (mergekit follows the tokenizer's
  dictionary order, which is not stable), so the output is reproducible.
Tokens whose id is beyond a model's vocab size (`vocab_size` in config.json) are padding rows
it never trained, so they count as absent. A model without tokenizer files is taken to share
the base's tokenizer (mergekit does the same).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import Checkpoint
from ..io.output_dir import TOKENIZER_FILES
from ..representations.models import require_transformers
from ..values import is_integer
from .names import is_input_embedding
from .tokens import padded_size

MODEL_PREFIX = "model:"


@dataclass(frozen=True)
class TokenizerSource:
    """A parsed `tokenizer_source`: kind is base, union or model (then `model` is its path)."""

    kind: str
    model: str | None = None


def parse_tokenizer_source(value: Any) -> TokenizerSource:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("`tokenizer_source` must be `base`, `union` or `model:<path>`")
    if value in ("base", "union"):
        return TokenizerSource(value)
    path = value.removeprefix(MODEL_PREFIX).strip()
    if not path:
        raise ConfigError("`tokenizer_source: model:` needs the model's path after `model:`")
    return TokenizerSource("model", path)


@dataclass
class OutputVocabulary:
    """The merged model's tokenizer, and for every input model the row of its embedding that
    each output token comes from (-1: the model lacks the token)."""

    tokenizer: Any
    size: int
    rows: dict[str, torch.Tensor]
    model_sizes: dict[str, int]
    # The output tokenizer's token -> id map, and each model's own (its tokenizer's, or the
    # base's when it has none).
    token_ids: dict[str, int]
    model_vocabs: dict[str, dict[str, int]]
    # Embedding rows of the output: `size` padded up to `pad_to_multiple_of` (tokenizer: block).
    padded_size: int

    def is_identity(self, model: str, tensor_rows: int) -> bool:
        """Whether the model's tensor already is in output order and size (no copy needed)."""
        rows = self.rows[model]
        return tensor_rows == self.padded_size == self.size and bool(torch.equal(rows, torch.arange(self.size)))

    def save(self, directory: Path) -> list[str]:
        before = {p.name for p in directory.iterdir()}
        self.tokenizer.save_pretrained(str(directory))
        return sorted({p.name for p in directory.iterdir()} - before)


def has_tokenizer_files(directory: Path | None) -> bool:
    return directory is not None and any((directory / name).is_file() for name in TOKENIZER_FILES)


def build_output_vocabulary(
    source: TokenizerSource, base: str, models: list[str], checkpoints: dict[str, Checkpoint],
    add_tokens: list[str] = (), pad_to_multiple_of: int | None = None,
) -> OutputVocabulary:
    """`base` is the base model (or the first model); `models` every model the config names;
    `add_tokens` (the `tokenizer.tokens` keys) join the output vocabulary where it lacks them."""
    what = f"tokenizer_source: {source.kind}"
    transformers = require_transformers(f"{what} (it reads the models' tokenizers)")
    base_directory = checkpoints[base].directory
    if not has_tokenizer_files(base_directory):
        raise ConfigError(f"{what}: the base model {base} has no tokenizer files to start from")
    tokenizers = {base: _load(transformers, base_directory, base)}
    for name in models:
        directory = checkpoints[name].directory
        if name != base and has_tokenizer_files(directory):
            tokenizers[name] = _load(transformers, directory, name)
    sizes = {name: model_vocab_size(checkpoints[name], len(tokenizers.get(name, tokenizers[base]).get_vocab())) for name in models}
    _check_within_embedding(tokenizers[base], sizes[base], base, what)

    if source.kind == "base":
        # a copy when tokens are added: the base tokenizer maps the other models' rows
        output = _fresh_copy(transformers, tokenizers[base], base) if add_tokens else tokenizers[base]
    elif source.kind == "union":
        output = _union(transformers, tokenizers, base, sizes)
    else:
        output = _load(transformers, _model_directory(source.model, checkpoints), source.model)
    known = set(output.get_vocab())
    for token in add_tokens:
        if token not in known:
            output.add_tokens(token)
            known.add(token)

    vocab = output.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError(f"{what}: the output tokenizer's token ids are not 0..{len(vocab) - 1} without gaps; it cannot index an embedding")
    by_id = sorted(vocab, key=vocab.__getitem__)
    rows, model_vocabs = {}, {}
    for name in models:
        model_vocabs[name] = model_vocab = tokenizers.get(name, tokenizers[base]).get_vocab()
        ids = [model_vocab.get(token, -1) for token in by_id]
        rows[name] = torch.tensor([i if 0 <= i < sizes[name] else -1 for i in ids], dtype=torch.int64)
    return OutputVocabulary(tokenizer=output, size=len(vocab), rows=rows, model_sizes=sizes, token_ids=vocab,
                            model_vocabs=model_vocabs, padded_size=padded_size(len(vocab), pad_to_multiple_of))


def model_vocab_size(checkpoint: Checkpoint, tokenizer_size: int) -> int:
    """Rows the model trained: config.json's vocab_size, else its input embedding's rows,
    else its tokenizer's size."""
    value = (checkpoint.config or {}).get("vocab_size")
    if is_integer(value):
        return value
    embeddings = [n for n in checkpoint.names if is_input_embedding(n)]
    return checkpoint.info(embeddings[0]).shape[0] if embeddings else tokenizer_size


def _load(transformers: Any, directory: Path | None, name: str) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    except Exception as exc:  # transformers raises many types for unreadable tokenizers
        raise CheckpointError(f"cannot load the tokenizer of {name} ({type(exc).__name__}: {exc})") from None


def _model_directory(path: str, checkpoints: dict[str, Checkpoint]) -> Path:
    if path in checkpoints and checkpoints[path].directory is not None:
        return checkpoints[path].directory
    directory = Path(path).expanduser()
    if not has_tokenizer_files(directory):
        raise ConfigError(
            f"`tokenizer_source: {path}`: not base, union, nor a model directory with tokenizer files"
        )
    return directory


def _check_within_embedding(tokenizer: Any, size: int, name: str, what: str) -> None:
    beyond = sorted(i for i in tokenizer.get_vocab().values() if i >= size)
    if beyond:
        raise ConfigError(
            f"{what}: the tokenizer of {name} has {len(beyond)} token(s) with ids >= its vocab_size {size} "
            f"(first: {beyond[0]}); they have no embedding row. Remove them from its tokenizer first"
        )


def _fresh_copy(transformers: Any, tokenizer: Any, name: str) -> Any:
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return _load(transformers, Path(scratch), name)


def _union(transformers: Any, tokenizers: dict[str, Any], base: str, sizes: dict[str, int]) -> Any:
    # A fresh copy: adding tokens must not change the base tokenizer other models map through.
    output = _fresh_copy(transformers, tokenizers[base], base)
    known = set(output.get_vocab())
    plain: list[str] = []
    added: dict[str, Any] = {}
    for name, tokenizer in tokenizers.items():
        specials = {info.content: info for i, info in tokenizer.added_tokens_decoder.items() if i < sizes[name]}
        vocab = tokenizer.get_vocab()
        for token in sorted(vocab, key=vocab.__getitem__):
            if vocab[token] >= sizes[name]:
                continue
            if token in specials:
                added.setdefault(token, specials[token])
            elif token not in known:
                known.add(token)
                plain.append(token)
    output.add_tokens(plain)
    for info in added.values():
        output.add_tokens([info], special_tokens=bool(info.special))
    return output
