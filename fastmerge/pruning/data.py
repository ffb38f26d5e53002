"""Data for the statistics pass: files of texts (causal LM) or of pairs (contrastive).

Formats (UTF-8, blank lines skipped):
- causal_lm: a .txt file with one text per line, or a .jsonl file whose records are strings or
  objects with a `text` string.
- contrastive: a .jsonl file whose records are `{"query": str, "positive": str,
  "negatives": [str, ...]}` (negatives optional). Other passages in the batch serve as
  in-batch negatives, so negatives are extra hard ones, not a requirement.

Batches keep file order (the pass is deterministic and needs no seed) and stop after
`num_batches`. Empty files fail here, before any model is loaded, naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError


@dataclass(frozen=True)
class Pair:
    """One contrastive example: a query, its positive passage and optional hard negatives."""

    query: str
    positive: str
    negatives: tuple[str, ...] = field(default_factory=tuple)


def _records(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise ConfigError(f"data file {path} is empty; the statistics pass needs at least one example")
    return lines


def _json(path: Path, line_no: int, line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None


def load_texts(path: Path) -> list[str]:
    """The texts of a causal-LM data file, in file order."""
    lines = _records(path)
    if path.suffix.lower() not in (".jsonl", ".json"):
        return [line for _, line in lines]
    texts = []
    for line_no, line in lines:
        record = _json(path, line_no, line)
        if isinstance(record, dict):
            record = record.get("text")
        if not isinstance(record, str) or not record.strip():
            raise ConfigError(f"{path}:{line_no}: expected a string or an object with a non-empty `text`")
        texts.append(record)
    return texts


def load_pairs(path: Path) -> list[Pair]:
    """The (query, positive, negatives) records of a contrastive data file, in file order."""
    pairs = []
    for line_no, line in _records(path):
        record = _json(path, line_no, line)
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{line_no}: expected an object with `query` and `positive`")
        query, positive, negatives = record.get("query"), record.get("positive"), record.get("negatives", [])
        if not (isinstance(query, str) and query.strip() and isinstance(positive, str) and positive.strip()):
            raise ConfigError(f"{path}:{line_no}: `query` and `positive` must be non-empty strings")
        if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
            raise ConfigError(f"{path}:{line_no}: `negatives` must be a list of non-empty strings")
        pairs.append(Pair(query, positive, tuple(negatives)))
    return pairs


def batched(items: list, batch_size: int, num_batches: int) -> Iterator[list]:
    """Consecutive batches of `items` in order, at most `num_batches` of them."""
    for start in range(0, min(len(items), batch_size * num_batches), batch_size):
        yield items[start : start + batch_size]
