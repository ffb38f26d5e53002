"""Shared fixtures: tiny Llama-shaped checkpoints written the way Hugging Face writes them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# A model path that does not exist but reads as `org/name` is looked up on the Hugging Face Hub
# (fastmerge/io/hub.py); the tests build their own models and must never reach the network, so
# that lookup stops at the cache here (set before huggingface_hub is imported: it reads it once).
os.environ["HF_HUB_OFFLINE"] = "1"

# The benchmarks (bench/, not installed) are imported by their tests. Appending the repository
# root, rather than prepending it, keeps the installed fastmerge ahead of the source tree.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from _support import TINY
from fastmerge.demo import fine_tune_of, make_state, write_checkpoint


@pytest.fixture
def tiny_models(tmp_path: Path) -> dict[str, Path]:
    """A bf16 base and three fine-tunes, sharded (~20 KB shards, several per model)."""
    base = make_state(TINY, seed=0)
    models = {"base": write_checkpoint(tmp_path / "base", base, TINY, max_shard_bytes=20_000)}
    for i in (1, 2, 3):
        models[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", fine_tune_of(base, seed=i, scale=0.05), TINY, max_shard_bytes=20_000)
    return models
