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

from .engine import prepare_plan, run
from .errors import ConfigError
from .methods import get_method
from .representations.samples import load_samples


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
    (nothing to merge yet), so at least two checkpoints are needed; with one, step 1 merges the
    first fine-tune with the base too. run_options go to `fastmerge.run` (device, seed, quiet, ...).

    Everything that can be checked without merging (arguments, models, samples files) is
    checked before `out_dir` is created, so bad input leaves nothing behind.
    """
    checkpoints = [Path(c) for c in checkpoints]
    if not checkpoints:
        raise ConfigError("continual merging needs at least one checkpoint")
    if base is None and len(checkpoints) < 2:
        raise ConfigError(
            f"continual merging of one checkpoint ({checkpoints[0]}) without a base has nothing to merge "
            "(step 1 is the first checkpoint itself); give more checkpoints or a base model"
        )
    if samples is not None and len(samples) != len(checkpoints):
        raise ConfigError(f"give one samples entry per checkpoint: {len(checkpoints)} checkpoints, {len(samples)} samples entries")
    if samples is not None and "samples" not in get_method(method).global_params:
        raise ConfigError(f"merge_method {method} reads no samples; drop --samples (samples=...), which data-aware "
                          "methods such as recall use")
    if method == "recall" and samples is None and not (params and "samples" in params):
        raise ConfigError("continual RECALL needs each step's samples (samples=[...] with one entry per checkpoint)")

    def step_config(step: int, previous: Path | None) -> dict[str, Any]:
        """The merge config of `step` (1-based), with `previous` the running model so far."""
        models = ([previous] if previous is not None else []) + [checkpoints[step - 1]]
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
        return config

    first_step = 1 if base is not None else 2
    # Plan every step before writing anything, the previous fine-tune standing in for the
    # running model (a merge of the same architecture that does not exist yet).
    for step in range(first_step, len(checkpoints) + 1):
        _check_plan(step_config(step, checkpoints[step - 2] if step > 1 else None), run_options)
    for entry in [*(samples or []), *([params["samples"]] if params and "samples" in params else [])]:
        load_samples(entry)

    # OUT is made by the first step's staged output, which removes the directories it made
    # again if that step fails: a run that fails before its first step leaves no empty OUT.
    results = [] if base is not None else [checkpoints[0]]
    for step in range(first_step, len(checkpoints) + 1):
        previous = results[-1] if results else None
        results.append(run(step_config(step, previous), step_directory(Path(out_dir), step), **run_options).output_dir)
    return results


def _check_plan(config: dict[str, Any], run_options: Mapping[str, Any]) -> None:
    """Plan one step's merge (config, models and their tensors; no data read) to fail early."""
    plan = prepare_plan(config, allow_pickle=run_options.get("allow_pickle", False),
                        truncate_embeddings=run_options.get("truncate_embeddings", False))
    for checkpoint in plan.checkpoints:
        checkpoint.close()

