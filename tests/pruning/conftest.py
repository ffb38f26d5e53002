"""A tiny Llama checkpoint and small domain/general text files for the pruning tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _support import TINY
from fastmerge.demo import make_state, write_checkpoint


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "model", make_state(TINY, seed=0), TINY, max_shard_bytes=20_000)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def text_data(tmp_path: Path) -> dict[str, str]:
    """Word-level texts over the demo tokenizer's vocabulary (w0..., letters)."""
    domain = [{"text": " ".join(f"w{(i * 7 + j) % 40}" for j in range(12))} for i in range(6)]
    general = [" ".join(chr(97 + (i + j) % 26) for j in range(12)) for i in range(6)]
    (tmp_path / "general.txt").write_text("\n".join(general) + "\n")
    return {"domain": str(write_jsonl(tmp_path / "domain.jsonl", domain)), "general": str(tmp_path / "general.txt")}
