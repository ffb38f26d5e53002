"""Trained checkpoints cached by a hash of their recipe, so reruns skip training.

A recipe is a JSON-able dict of everything that determines the weights (model shape, training
settings, data spec, seed, and the parent checkpoint's recipe for fine-tunes). The cache
directory is named by its SHA-256, built in a temporary sibling and renamed into place only
when complete, so an interrupted run never leaves a half-written checkpoint that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

# Bump when training or data generation changes in a way the recipe fields do not capture.
RECIPE_VERSION = 2
RECIPE_FILE = "recipe.json"


def default_cache_dir() -> Path:
    """FASTMERGE_QUALITY_CACHE, else ~/.cache/fastmerge/quality (outside the repository)."""
    override = os.environ.get("FASTMERGE_QUALITY_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "fastmerge" / "quality"


def recipe_key(recipe: dict) -> str:
    canonical = json.dumps({"version": RECIPE_VERSION, **recipe}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def cached_checkpoint(cache_dir: Path, name: str, recipe: dict, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The checkpoint directory for `recipe`, calling `build(tmp_dir)` first if it is not cached.

    Returns (directory, built_now). `name` only makes the directory readable (``name-<hash>``).
    """
    final = cache_dir / f"{name}-{recipe_key(recipe)}"
    if (final / RECIPE_FILE).is_file():
        return final, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        build(staging)
        # Written last: its presence marks the checkpoint complete.
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True))
        if final.exists():  # a stale, incomplete directory from an older crash
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final, True
