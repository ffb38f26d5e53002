"""Loading the text samples that data-aware methods (RECALL) run the models on.

Samples come from a config (`parameters: {samples: ...}`) as a path to a .txt file (one sample
per non-blank line), a .jsonl file (one object per line; the text is under "text", or the
object's only string value), or an inline list of strings. Bad samples fail here, before any
model is loaded, with the file and line at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError

# Keys tried, in order, for the text of a jsonl record (common dataset layouts).
_TEXT_KEYS = ("text", "content", "prompt", "input")


def load_samples(source: str | Path | Sequence[str]) -> list[str]:
    """The samples in `source` (a .txt / .jsonl path or a list of strings), in file order."""
    if isinstance(source, (str, Path)):
        samples = _read_file(Path(source))
        where = str(source)
    else:
        samples = list(source)
        where = "the samples list"
        for i, sample in enumerate(samples):
            if not isinstance(sample, str) or not sample.strip():
                raise ConfigError(f"sample {i} in {where} is not a non-empty string: {sample!r:.60}")
    if not samples:
        raise ConfigError(f"no samples in {where}; RECALL needs at least one text sample of the new task")
    return samples


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"samples file {path} does not exist (parameters.samples)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"samples file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if "\x00" in text:
        raise ConfigError(f"samples file {path} is not text (it contains NUL bytes)")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if path.suffix.lower() in (".jsonl", ".json"):
        return [_jsonl_text(path, n, line) for n, line in lines]
    return [line for _, line in lines]


def _jsonl_text(path: Path, line_no: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
    if isinstance(record, str) and record.strip():
        return record
    if isinstance(record, dict):
        for key in _TEXT_KEYS:
            if isinstance(record.get(key), str) and record[key].strip():
                return record[key]
        strings = [v for v in record.values() if isinstance(v, str) and v.strip()]
        if len(strings) == 1:
            return strings[0]
    raise ConfigError(
        f"{path}:{line_no}: cannot find the sample text; give each line a non-empty "
        f"string under one of {', '.join(_TEXT_KEYS)}"
    )
