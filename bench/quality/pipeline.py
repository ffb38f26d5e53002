"""The benchmark end to end: data, cached training, scoring, merges, continual learning, report.

Stages (each timed into the JSON):
1. data      fixed train/val/test splits per task; each task's training prompts written to a
             .txt file that data-aware methods (RECALL) read as `parameters.samples`.
2. train     base pre-trained on the general stream; one full fine-tune per task from the base;
             the sequential chain base -> T1 -> T2 -> ... (catastrophic-forgetting baseline).
             All cached by recipe hash.
3. score     every model on every task's test split, plus retention on held-out general text.
4. merge     every registered method merges all fine-tunes; its grid is searched on the
             validation split and only the chosen point is scored on test.
5. continual tasks arrive in order; (a) the sequential chain, (b) for each method, the running
             merge folded with each new fine-tune (`fastmerge.continual.run_continual`), with the
             hyper-parameters chosen in stage 4. Average accuracy and forgetting after every step.
6. prune     each fine-tune pruned at 50% with every GAPrune-module score, plus pruned-then-merged
             and merged-then-pruned rows (`pruning.py`).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fastmerge.errors import FastmergeError

from .cache import cached_checkpoint, default_cache_dir
from .evaluate import general_retention, load_model, task_accuracy
from .merging import applicable, available_methods, grid_for, merge_config, run_merge
from .model import new_model
from .profiles import FULL, QUICK, Profile
from .pruning import prune_rows
from .scoring import continual_summary
from .tasks import TASKS, Splits, general_text, make_splits
from .tokenizer import save_hf_tokenizer
from .training import finetune, pretrain

# Checkpoints are split into about this many safetensors shards, like a hub model, so merges
# exercise the sharded-index path even for the quick profile's tiny model.
SHARDS = 3


@dataclass
class Context:
    profile: Profile
    seed: int
    cache_dir: Path
    out_dir: Path
    log: Callable[[str], None]
    splits: dict[str, Splits] = field(default_factory=dict)
    prompt_files: dict[str, Path] = field(default_factory=dict)
    general_eval: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = fn()
        self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - started, 2)
        self.log(f"[{stage}] done in {self.timings[stage]:.1f}s")
        return result


# --- 1. data ------------------------------------------------------------------------------------

def prepare_data(ctx: Context) -> None:
    p = ctx.profile
    data_dir = ctx.out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in p.tasks:
        ctx.splits[name] = make_splits(TASKS[name], p.n_train, p.n_val, p.n_test, ctx.seed)
        path = data_dir / f"{name}_train_prompts.txt"
        path.write_text("".join(e.prompt + "\n" for e in ctx.splits[name].train))
        ctx.prompt_files[name] = path
    ctx.general_eval = general_text(p.general_eval_lines, ctx.seed, "eval")


# --- 2. training --------------------------------------------------------------------------------

def _save(model, directory: Path, losses: list[float]) -> None:
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    model.save_pretrained(str(directory), max_shard_size=max(max(sizes), sum(sizes) // SHARDS))
    save_hf_tokenizer(directory)
    (directory / "losses.txt").write_text("\n".join(f"{x:.5f}" for x in losses) + "\n")


def _fingerprint(text: str) -> str:
    """Hash of the exact training data, so a change to a generator invalidates cached models."""
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def train_base(ctx: Context) -> tuple[Path, dict]:
    p = ctx.profile
    text = general_text(p.general_train_lines, ctx.seed, "train")
    recipe = {"kind": "base", "shape": p.shape.to_dict(), "train": p.pretrain.to_dict(),
              "data": _fingerprint(text), "seed": ctx.seed}

    def build(directory: Path) -> None:
        model = new_model(p.shape, ctx.seed)
        _save(model, directory, pretrain(model, text, p.pretrain, ctx.seed))

    path, built = cached_checkpoint(ctx.cache_dir, "base", recipe, build)
    ctx.log(f"base: {'trained' if built else 'cached'} {path}")
    return path, recipe


def train_finetune(ctx: Context, parent: tuple[Path, dict], task: str, label: str) -> tuple[Path, dict]:
    """Full fine-tune of the parent checkpoint on `task`'s training split, replaying the
    pre-training stream when the profile asks for it."""
    p = ctx.profile
    replay = general_text(p.general_train_lines, ctx.seed, "train") if p.finetune.replay_batch else ""
    data = "".join(e.text for e in ctx.splits[task].train)
    recipe = {"kind": "finetune", "parent": parent[1], "task": task, "train": p.finetune.to_dict(),
              "data": _fingerprint(data + replay), "seed": ctx.seed}

    def build(directory: Path) -> None:
        model = load_model(parent[0])
        _save(model, directory, finetune(model, ctx.splits[task].train, p.finetune, ctx.seed, replay))

    path, built = cached_checkpoint(ctx.cache_dir, label, recipe, build)
    ctx.log(f"{label}: {'trained' if built else 'cached'} {path}")
    return path, recipe


def train_all(ctx: Context) -> dict[str, Path]:
    """base, ft:<task> for every task, seq:<k> for the sequential chain (seq:1 is ft:<first>)."""
    base = train_base(ctx)
    models = {"base": base[0]}
    finetunes = {t: train_finetune(ctx, base, t, f"ft-{t}") for t in ctx.profile.tasks}
    models.update({f"ft:{t}": ft[0] for t, ft in finetunes.items()})
    chain = finetunes[ctx.profile.tasks[0]]
    models["seq:1"] = chain[0]
    for step, task in enumerate(ctx.profile.tasks[1:], start=2):
        chain = train_finetune(ctx, chain, task, f"seq{step}-{task}")
        models[f"seq:{step}"] = chain[0]
    return models


# --- 3. scoring ---------------------------------------------------------------------------------

def score(ctx: Context, path: Path, split: str = "test", retention: bool = True,
          tasks: list[str] | None = None) -> dict[str, Any]:
    """Accuracy per task on `split` (and retention on general text) of the checkpoint at `path`;
    `tasks` narrows the tasks scored (default: all of the profile's)."""
    model = load_model(path)
    accuracy = {t: task_accuracy(model, TASKS[t], getattr(ctx.splits[t], split)) for t in tasks or ctx.profile.tasks}
    result: dict[str, Any] = {"accuracy": accuracy, "mean": sum(accuracy.values()) / len(accuracy)}
    if retention:
        kept = general_retention(model, ctx.general_eval, ctx.profile.pretrain.window)
        result["general"] = {"next_char_accuracy": kept.next_char_accuracy, "loss": kept.loss}
    return result


# --- 4. merging all fine-tunes ------------------------------------------------------------------

def merge_all(ctx: Context, models: dict[str, Path]) -> dict[str, dict]:
    tasks = list(ctx.profile.tasks)
    finetunes = [models[f"ft:{t}"] for t in tasks]
    newest_samples = ctx.prompt_files[tasks[-1]]
    results = {}
    for method in available_methods():
        if not applicable(method, len(finetunes)):
            results[method] = {"status": "n/a", "message": f"takes at most {grid_for(method).max_models} "
                               f"fine-tune(s) beside the base, not {len(finetunes)}"}
            continue
        results[method] = _search_grid(ctx, method, models["base"], finetunes, newest_samples)
        ctx.log(f"merge {method}: {results[method]['status']} {results[method].get('test', {}).get('mean', '')}")
    return results


def _search_grid(ctx: Context, method: str, base: Path, finetunes: list[Path], samples: Path) -> dict:
    """Try every grid point on validation; score the best on test. Keeps only the best merge."""
    method_dir = ctx.out_dir / "merges" / method
    tried, errors = [], []
    best: tuple[float, int] | None = None
    for index, (global_params, model_params) in enumerate(grid_for(method).points()):
        config = merge_config(method, base, finetunes, global_params, model_params, samples)
        try:
            merged = run_merge(config, method_dir / f"grid{index}", ctx.seed)
        except FastmergeError as exc:
            errors.append(f"{global_params} {model_params}: {exc}")
            continue
        val = score(ctx, merged, "val", retention=False)["mean"]
        tried.append({"parameters": global_params, "model_parameters": model_params, "val_mean": val})
        if best is None or val > best[0]:
            best = (val, index)
    if best is None:
        return {"status": "failed", "message": "; ".join(errors)}
    chosen = method_dir / f"grid{best[1]}"
    for other in method_dir.glob("grid*"):
        if other != chosen:
            shutil.rmtree(other)
    point = next(t for t in tried if t["val_mean"] == best[0])
    return {"status": "ok", "chosen": {k: point[k] for k in ("parameters", "model_parameters")},
            "grid": tried, "errors": errors, "path": str(chosen), **score(ctx, chosen)}


# --- 5. continual learning ----------------------------------------------------------------------

def _continual_record(ctx: Context, steps: list[Path]) -> dict:
    """Scores after each step, on the tasks seen so far only: average accuracy and forgetting
    never look at the others, and scoring them was two fifths of this stage's time."""
    order = list(ctx.profile.tasks)
    scores = [score(ctx, path, retention=False, tasks=order[: k + 1])["accuracy"] for k, path in enumerate(steps)]
    summary = continual_summary(scores, order)
    return {"steps": [{**s, "accuracy": a} for s, a in zip(summary, scores)]}


def continual(ctx: Context, models: dict[str, Path], merges: dict[str, dict]) -> dict[str, Any]:
    from fastmerge.continual import run_continual
    from fastmerge.methods import get_method

    tasks = list(ctx.profile.tasks)
    out: dict[str, Any] = {"order": tasks, "sequential_finetuning":
                           _continual_record(ctx, [models[f"seq:{k}"] for k in range(1, len(tasks) + 1)])}
    out["methods"] = {}
    for method, merged in merges.items():
        if merged["status"] != "ok" or not applicable(method, 2):
            continue
        chosen = merged["chosen"]
        try:
            steps = run_continual(
                [models[f"ft:{t}"] for t in tasks], ctx.out_dir / "continual" / method, method=method,
                base=models["base"] if get_method(method).requires_base else None,
                params=chosen["parameters"], model_params=chosen["model_parameters"],
                samples=[str(ctx.prompt_files[t]) for t in tasks] if grid_for(method).samples else None,
                dtype="float32", overwrite=True, quiet=True, seed=ctx.seed, threads=2,
            )
        except FastmergeError as exc:
            out["methods"][method] = {"status": "failed", "message": str(exc)}
            continue
        out["methods"][method] = {"status": "ok", **_continual_record(ctx, steps)}
    return out


# --- driver -------------------------------------------------------------------------------------

def _quiet_transformers() -> None:
    """No per-load progress bars or notices: the benchmark loads hundreds of checkpoints."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def add_study_args(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """The options of a study run on the benchmark's cached models (fda_ablation, lora_extraction)."""
    parser.add_argument("--quick", action="store_true", help="the quick profile's models")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)


def study_models(args: argparse.Namespace) -> tuple[Context, dict[str, Path]]:
    """The data and the trained models for a study (`add_study_args`' options): from the cache,
    trained first if missing, as `python -m bench.quality` would."""
    torch.set_num_threads(2)
    _quiet_transformers()
    ctx = Context(QUICK if args.quick else FULL, args.seed, args.cache_dir or default_cache_dir(), args.out, lambda message: None)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    prepare_data(ctx)
    return ctx, train_all(ctx)


def run_benchmark(profile: Profile, out_dir: Path, cache_dir: Path, seed: int = 0,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage and return the results dict (the report module writes it out)."""
    torch.set_num_threads(2)
    _quiet_transformers()
    ctx = Context(profile, seed, Path(cache_dir), Path(out_dir), log)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    ctx.timed("data", lambda: prepare_data(ctx))
    models = ctx.timed("train", lambda: train_all(ctx))
    scored = ctx.timed("score", lambda: {name: score(ctx, models[name]) for name in
                                         ["base", *(f"ft:{t}" for t in profile.tasks)]})
    merges = ctx.timed("merge", lambda: merge_all(ctx, models))
    sequence = ctx.timed("continual", lambda: continual(ctx, models, merges))
    pruning = ctx.timed("prune", lambda: prune_rows(ctx, models, merges, score))
    ctx.timings["total"] = round(time.perf_counter() - started, 2)
    # CPU seconds of this process: comparable across runs even when other jobs share the cores.
    ctx.timings["cpu_total"] = round(time.process_time() - cpu_started, 2)
    return {
        "profile": profile.to_dict(), "seed": seed, "tasks": {t: TASKS[t].description for t in profile.tasks},
        "models": scored, "merges": merges, "continual": sequence, "pruning": pruning, "timings": ctx.timings,
        "checkpoints": {name: str(path) for name, path in models.items()},
    }
