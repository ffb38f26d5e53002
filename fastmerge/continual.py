"""Continual merging: fold a sequence of fine-tunes, trained one after another, into one model.

After fine-tune i, the running model is merge(running model after i-1, fine-tune i) with any
merge method (RECALL by default, where fine-tune i is the `new` model and its task's samples
drive the layer weights). Each step is an ordinary `fastmerge.run` into its own directory, so
every intermediate model is a complete checkpoint that can be evaluated (the forgetting curve)
and a failed step leaves the earlier ones intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .engine import run
from .errors import ConfigError


def step_directory(out_dir: Path, step: int) -> Path:
    """Where the merged model after fine-tune `step` (1-based) goes."""
    return out_dir / f"step_{step:02d}"


def run_continual(
    checkpoints: Sequence[str | Path],
    out_dir: str | Path,
    method: str = "recall",
    base: str | Path | None = None,
    params: Mapping[str, Any] | None = None,
    model_params: Mapping[str, Any] | None = None,
    samples: Sequence[Any] | None = None,
    dtype: str | None = None,
    **run_options: Any,
) -> list[Path]:
    """Merge after each fine-tune; returns one model directory per checkpoint, in order.

    checkpoints: the fine-tunes in training order. params: method-level parameters for every
    step; model_params: parameters given to each model entry (e.g. `weight` for linear).
    samples: one entry per checkpoint (a .txt/.jsonl path or a list of texts), that step's new
    task's samples (RECALL needs them). Without a base, step 1 is the first checkpoint itself
    (nothing to merge yet); with one, step 1 merges the first fine-tune with the base too.
    run_options go to `fastmerge.run` (device, seed, quiet, ...).
    """
    checkpoints = [Path(c) for c in checkpoints]
    if not checkpoints:
        raise ConfigError("continual merging needs at least one checkpoint")
    if samples is not None and len(samples) != len(checkpoints):
        raise ConfigError(f"give one samples entry per checkpoint: {len(checkpoints)} checkpoints, {len(samples)} samples entries")
    if method == "recall" and samples is None and not (params and "samples" in params):
        raise ConfigError("continual RECALL needs each step's samples (samples=[...] with one entry per checkpoint)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    running: Path | None = None
    results = []
    for step, checkpoint in enumerate(checkpoints, start=1):
        if running is None and base is None:
            running = checkpoint
            results.append(checkpoint)
            continue
        models = ([running] if running is not None else []) + [checkpoint]
        step_params = dict(params or {})
        if samples is not None:
            step_params["samples"] = samples[step - 1]
        config: dict[str, Any] = {
            "merge_method": method,
            "models": [{"model": str(m), "parameters": dict(model_params or {})} for m in models],
            "parameters": step_params,
        }
        if base is not None:
            config["base_model"] = str(base)
        if dtype is not None:
            config["dtype"] = dtype
        running = run(config, step_directory(out_dir, step), **run_options).output_dir
        results.append(running)
    return results
