"""Parity with mergekit: the same configs through `mergekit-yaml` and `fastmerge.run`, compared.

Not part of CI: it needs mergekit 0.1.5 installed beside fastmerge, in its own virtual
environment so it cannot change fastmerge's torch, e.g.

    python -m venv --system-site-packages /opt/mkvenv
    /opt/mkvenv/bin/pip install mergekit==0.1.5 torch==$(python -c "import torch; print(torch.__version__)")
    python bench/parity_mergekit.py --mergekit-yaml /opt/mkvenv/bin/mergekit-yaml

It builds tiny sharded float32 Llama checkpoints (fastmerge.demo), writes one config per method
registered in fastmerge (mergekit example style: gradients, filters, per-model parameters), runs
both tools and prints, per method, the largest absolute difference and the largest difference
relative to the tensor's scale (max |mergekit tensor|). Deterministic methods must agree within
--tolerance (METHODS.md: fp32 configs, up to elements at exact magnitude ties). Random methods
(DARE, DELLA) draw different masks by design (fastmerge: seeded Philox; mergekit: torch's RNG), so
for them the script compares statistics instead: the fraction of elements left at the base value
and the mean |merged - base|. Methods mergekit does not have are listed as fastmerge-only; a
registered method without a recipe here is reported as MISSING so the script keeps covering
every method. Exit status 1 when a deterministic method is out of tolerance or a run fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors.torch import load_file

import fastmerge
from fastmerge.demo import LlamaShape, fine_tune_of, make_state, write_checkpoint
from fastmerge.methods import method_names

SHAPE = LlamaShape(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)
FINE_TUNES = ("ft1", "ft2", "ft3")
SEED = 1234


@dataclass(frozen=True)
class Recipe:
    """How to write one method's parity config. `config(paths)` returns the YAML mapping (paths:
    model name -> directory); `random` marks methods compared by statistics."""

    config: Callable[[dict[str, str]], dict[str, Any]]
    random: bool = False


def task_vector_config(method: str, model_params: list[dict[str, Any]], parameters: dict[str, Any] | None = None):
    """base + the three fine-tunes, one parameter dict per fine-tune (mergekit example layout:
    the base is also listed among the models, without parameters)."""
    def build(paths: dict[str, str]) -> dict[str, Any]:
        models = [{"model": paths["base"]}] + [
            {"model": paths[name], "parameters": params} for name, params in zip(FINE_TUNES, model_params)
        ]
        return {"merge_method": method, "base_model": paths["base"], "models": models,
                "parameters": parameters or {}, "dtype": "float32"}
    return build


def plain_config(method: str, model_params: list[dict[str, Any]] | None, parameters: dict[str, Any] | None = None,
                 base: bool = False, count: int = 3):
    """`count` fine-tunes, optionally with the base as `base_model` (and listed first)."""
    def build(paths: dict[str, str]) -> dict[str, Any]:
        models = [{"model": paths["base"]}] if base else []
        for i, name in enumerate(FINE_TUNES[:count]):
            entry: dict[str, Any] = {"model": paths[name]}
            if model_params is not None:
                entry["parameters"] = model_params[i]
            models.append(entry)
        config = {"merge_method": method, "models": models, "parameters": parameters or {}, "dtype": "float32"}
        if base:
            config["base_model"] = paths["base"]
        return config
    return build


# Per-model parameters in the style of mergekit's examples: a gradient over depth, a filter.
GRADIENT_WEIGHTS = [
    {"weight": [0.2, 0.6, 0.4]},
    {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.3}]},
    {"weight": 0.4},
]


def with_each(params: list[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    return [p | extra for p in params]


RECIPES: dict[str, Recipe] = {
    "linear": Recipe(plain_config("linear", GRADIENT_WEIGHTS)),
    "task_arithmetic": Recipe(task_vector_config("task_arithmetic", GRADIENT_WEIGHTS, {"lambda": 0.9})),
    "ties": Recipe(task_vector_config("ties", [
        {"weight": 1.0, "density": [1.0, 0.7, 0.1]},
        {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.3}], "density": 0.5},
        {"weight": -0.3, "density": 0.4},
    ], {"normalize": True, "int8_mask": True})),
    "breadcrumbs": Recipe(task_vector_config("breadcrumbs", with_each(GRADIENT_WEIGHTS, density=0.6, gamma=0.02))),
    "breadcrumbs_ties": Recipe(task_vector_config("breadcrumbs_ties", with_each(GRADIENT_WEIGHTS, density=0.6),
                                                  {"gamma": 0.02, "rescale": True})),
    "dare_ties": Recipe(task_vector_config("dare_ties", with_each(GRADIENT_WEIGHTS, density=0.5)), random=True),
    "dare_linear": Recipe(task_vector_config("dare_linear", with_each(GRADIENT_WEIGHTS, density=0.5)), random=True),
    "della": Recipe(task_vector_config("della", with_each(GRADIENT_WEIGHTS, density=0.5), {"epsilon": 0.1}), random=True),
    "della_linear": Recipe(task_vector_config("della_linear", with_each(GRADIENT_WEIGHTS, density=0.5),
                                              {"epsilon": 0.1}), random=True),
    "sce": Recipe(plain_config("sce", None, {"select_topk": 0.5}, base=True)),
    "slerp": Recipe(plain_config("slerp", None, {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.4}]},
                                 base=True, count=1)),
    "nuslerp": Recipe(plain_config("nuslerp", [{"weight": 0.7}, {"weight": 0.3}], count=2)),
    "multislerp": Recipe(plain_config("multislerp", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}])),
    "karcher": Recipe(plain_config("karcher", None)),
    "model_stock": Recipe(plain_config("model_stock", None, base=True)),
    "nearswap": Recipe(plain_config("nearswap", None, {"t": 0.001}, base=True, count=1)),
    "passthrough": Recipe(plain_config("passthrough", [{"scale": 0.5}], count=1)),
    "arcee_fusion": Recipe(plain_config("arcee_fusion", None, base=True, count=1)),
    "ram": Recipe(plain_config("ram", None, base=True)),
    "ramplus_tl": Recipe(plain_config("ramplus_tl", None, base=True)),
}


# ---------------------------------------------------------------- inputs and runs

def build_models(directory: Path) -> dict[str, str]:
    """A float32 base and three fine-tunes, sharded (~60 KB shards)."""
    base = make_state(SHAPE, seed=0)
    paths = {"base": write_checkpoint(directory / "base", base, SHAPE, torch.float32, max_shard_bytes=60_000)}
    for i, name in enumerate(FINE_TUNES, start=1):
        paths[name] = write_checkpoint(directory / name, fine_tune_of(base, seed=i, scale=0.05), SHAPE, torch.float32,
                                       max_shard_bytes=60_000)
    return {name: str(path.resolve()) for name, path in paths.items()}


def mergekit_methods(mergekit_yaml: Path) -> set[str]:
    """The method names the mergekit beside `mergekit-yaml` registers (asked in its own venv)."""
    python = mergekit_yaml.parent / "python"
    code = "from mergekit.merge_methods import registry; print(' '.join(m.spec.name for m in registry.registered_methods()))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def run_mergekit(mergekit_yaml: Path, config: Path, out: Path) -> tuple[float, str | None]:
    """(seconds, error text or None)."""
    started = time.perf_counter()
    result = subprocess.run(
        [str(mergekit_yaml), str(config), str(out), "--no-write-model-card", "--quiet", "--random-seed", str(SEED)],
        capture_output=True, text=True,
    )
    error = None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["exit status %d" % result.returncode])[-1]
    return time.perf_counter() - started, error


def run_fastmerge(config: Path, out: Path) -> tuple[float, str | None]:
    started = time.perf_counter()
    try:
        fastmerge.run(config, out, seed=SEED, quiet=True, overwrite=True, device="cpu")
    except Exception as error:  # reported per method; the other methods still run
        return time.perf_counter() - started, f"{type(error).__name__}: {error}"
    return time.perf_counter() - started, None


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# ---------------------------------------------------------------- comparisons

def compare_exact(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tolerance: float) -> dict[str, Any]:
    """Largest absolute and scale-relative differences, and how many elements exceed the tolerance."""
    worst_abs, worst_rel, worst_tensor, over = 0.0, 0.0, "", 0
    for name, reference in theirs.items():
        a, b = ours[name].double(), reference.double()
        diff = (a - b).abs()
        scale = max(float(b.abs().max()), 1e-30)
        over += int((diff > tolerance * scale).sum())
        if float(diff.max()) / scale >= worst_rel:
            worst_abs, worst_rel, worst_tensor = float(diff.max()), float(diff.max()) / scale, name
    return {"max_abs": worst_abs, "max_rel": worst_rel, "tensor": worst_tensor, "elements_over": over}


def statistics(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(fraction of elements equal to the base, mean |merged - base|) over the whole model."""
    same, total, moved = 0, 0, 0.0
    for name, tensor in merged.items():
        delta = (tensor.double() - base[name].double()).abs()
        same += int((delta == 0).sum())
        total += delta.numel()
        moved += float(delta.sum())
    return same / total, moved / total


def compare_random(ours, theirs, base) -> dict[str, Any]:
    ours_same, ours_moved = statistics(ours, base)
    theirs_same, theirs_moved = statistics(theirs, base)
    return {"kept_base": (ours_same, theirs_same), "mean_move": (ours_moved, theirs_moved),
            "mean_move_rel": abs(ours_moved - theirs_moved) / max(theirs_moved, 1e-30)}


# ---------------------------------------------------------------- main

def parity(method: str, recipe: Recipe, paths: dict[str, str], work: Path, mergekit_yaml: Path,
           tolerance: float) -> tuple[str, bool]:
    """One method: (report line, ok)."""
    config = work / f"{method}.yml"
    config.write_text(yaml.safe_dump(recipe.config(paths), sort_keys=False))
    mk_out, fm_out = work / f"{method}-mergekit", work / f"{method}-fastmerge"
    mk_seconds, mk_error = run_mergekit(mergekit_yaml, config, mk_out)
    fm_seconds, fm_error = run_fastmerge(config, fm_out)
    if mk_error or fm_error:
        return f"{method:17s} FAILED  mergekit: {mk_error or 'ok'} | fastmerge: {fm_error or 'ok'}", False
    ours, theirs = load_dir(fm_out), load_dir(mk_out)
    if set(ours) != set(theirs):
        return f"{method:17s} FAILED  tensor names differ: {sorted(set(ours) ^ set(theirs))[:5]}", False
    timing = f"(mergekit {mk_seconds:.1f} s, fastmerge {fm_seconds:.1f} s)"
    if recipe.random:
        stats = compare_random(ours, theirs, load_dir(Path(paths["base"])))
        kept, moved = stats["kept_base"], stats["mean_move"]
        line = (f"{method:17s} random  at-base fraction fastmerge {kept[0]:.4f} mergekit {kept[1]:.4f}; "
                f"mean |out-base| {moved[0]:.3e} vs {moved[1]:.3e} (rel diff {stats['mean_move_rel']:.2%}) {timing}")
        return line, True
    result = compare_exact(ours, theirs, tolerance)
    ok = result["elements_over"] == 0
    line = (f"{method:17s} {'ok     ' if ok else 'DIFFERS'} max abs {result['max_abs']:.3e}  max rel {result['max_rel']:.3e} "
            f"({result['tensor']}); elements over {tolerance:g}: {result['elements_over']} {timing}")
    return line, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit-yaml", type=Path, default=Path(shutil.which("mergekit-yaml") or "/opt/mkvenv/bin/mergekit-yaml"))
    parser.add_argument("--methods", nargs="*", help="only these methods (default: every registered one)")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="max |difference| / max |mergekit tensor|")
    parser.add_argument("--keep", type=Path, help="write models, configs and outputs here and keep them")
    parser.add_argument("--json", type=Path, help="also write the per-method lines to this JSON file")
    args = parser.parse_args(argv)
    if not args.mergekit_yaml.exists():
        print(f"mergekit-yaml not found at {args.mergekit_yaml}; install mergekit 0.1.5 (see this script's docstring)")
        return 0
    known = mergekit_methods(args.mergekit_yaml)
    work = args.keep or Path(tempfile.mkdtemp(prefix="fastmerge-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        paths = build_models(work / "models")
        lines, all_ok = [], True
        for method in args.methods or method_names():
            if method not in known:
                line, ok = f"{method:17s} fastmerge-only (mergekit has no such method)", True
            elif method not in RECIPES:
                line, ok = f"{method:17s} MISSING no parity recipe in bench/parity_mergekit.py", False
            else:
                line, ok = parity(method, RECIPES[method], paths, work, args.mergekit_yaml, args.tolerance)
            print(line, flush=True)
            lines.append(line)
            all_ok &= ok
        if args.json:
            args.json.write_text(json.dumps(lines, indent=2) + "\n")
        return 0 if all_ok else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
