"""GAPrune quality rows: prune the benchmark's fine-tunes at 50% and see what they keep.

Three comparisons, all with `fastmerge.pruning.prune` (objective causal_lm, MLP weights only,
one global threshold), exactly as a user would run it:

1. Each fine-tune `ft:<task>` pruned with every score in `SCORES` (gaprune, fisher, magnitude,
   random). Domain data = that task's training lines (prompt + answer + newline: what the
   fine-tune was trained on); general data = the general stream the base was pre-trained on.
   Scored on its own task's test split (the skill pruning must keep) and on general retention
   (the skill GAPrune's general-Fisher penalty protects). The paper's expected ordering is
   gaprune >= fisher >= magnitude >> random.
2. Pruned-then-merged: the gaprune masks of step 1 given to task_arithmetic as per-model
   `mask:` parameters (each task vector keeps only its model's kept weights), with the
   hyper-parameters task_arithmetic chose on validation in the merge stage.
3. Merged-then-pruned: that task_arithmetic merge pruned with gaprune, domain data = every
   task's training lines interleaved (the statistics pass reads data in file order and stops
   after `num_batches`, so interleaving is what lets every task into the sample).

Each row also reports the measured fraction of zero MLP weights in the scored checkpoint: a
pruned-then-merged model is not sparse (dropped task-vector entries fall back to the base), and
the table should say so rather than let it pass for a 50%-sparse model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from safetensors import safe_open

from fastmerge.errors import FastmergeError
from fastmerge.pruning import prune
from fastmerge.pruning.mask_file import FILE_NAME as MASK_FILE

from .merging import merge_config, run_merge
from .tasks import Example, general_text

if TYPE_CHECKING:
    from .pipeline import Context

# pipeline.score: (ctx, checkpoint, tasks=...) -> {"accuracy", "mean", "general"}. Passed in by the
# pipeline rather than imported, since the pipeline imports this module.
Evaluator = Callable[..., dict[str, Any]]

SCORES = ("gaprune", "fisher", "magnitude", "random")
SPARSITY = 0.5
TARGETS = ("mlp",)
MERGE_METHOD = "task_arithmetic"


@dataclass(frozen=True)
class PruneSettings:
    """How much data the statistics pass sees, per profile. Small on purpose: a statistics pass
    is one backward per batch, and the benchmark runs one per (fine-tune, data-aware score)."""

    scores: tuple[str, ...]
    batch_size: int
    num_batches: int
    max_length: int
    # Lines of the general stream written for the general pass (only batch_size * num_batches
    # of them are read).
    general_lines: int

    def to_dict(self) -> dict:
        return asdict(self)


SETTINGS = {
    "full": PruneSettings(scores=SCORES, batch_size=16, num_batches=8, max_length=64, general_lines=128),
    "quick": PruneSettings(scores=SCORES, batch_size=16, num_batches=4, max_length=64, general_lines=64),
}


def _write_jsonl(path: Path, lines: Iterable[str]) -> Path:
    """One JSON string per line: keeps each text's trailing newline, which the models were
    trained to emit after an answer (a .txt file would drop it)."""
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def interleave(groups: list[list[Example]]) -> list[Example]:
    """Round-robin over the groups (t1[0], t2[0], ..., t1[1], ...), so any prefix is balanced."""
    out: list[Example] = []
    for index in range(max(len(g) for g in groups)):
        out.extend(g[index] for g in groups if index < len(g))
    return out


def mlp_zero_fraction(checkpoint: Path) -> float:
    """Fraction of exactly-zero entries over the checkpoint's MLP weight tensors."""
    zeros = total = 0
    for shard in sorted(Path(checkpoint).glob("*.safetensors")):
        if shard.name == MASK_FILE:
            continue
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if ".mlp." in name and name.endswith(".weight"):
                    tensor = f.get_tensor(name)
                    zeros += int((tensor == 0).sum())
                    total += tensor.numel()
    if total == 0:
        raise FastmergeError(f"{checkpoint} has no MLP weight tensors to measure sparsity on")
    return zeros / total


def _scored(ctx: Context, evaluate: Evaluator, path: Path, tasks: list[str]) -> dict[str, Any]:
    """Test accuracy on `tasks` and general retention of a checkpoint, plus its MLP sparsity."""
    return {**evaluate(ctx, path, tasks=tasks), "mlp_sparsity": mlp_zero_fraction(path)}


def _prune(settings: PruneSettings, model: Path, score: str, domain: Path, general: Path, out: Path,
           seed: int) -> Path:
    config = {
        "model": str(model), "objective": "causal_lm", "score": score, "sparsity": SPARSITY,
        "targets": list(TARGETS), "batch_size": settings.batch_size, "num_batches": settings.num_batches,
        "max_length": settings.max_length, "seed": seed, "dtype": "float32",
        # Data-free scores (magnitude, random) skip the statistics pass and never read it.
        "data": {"domain": str(domain), "general": str(general)},
    }
    return prune(config, out, device="cpu", overwrite=True).output_dir


def prune_rows(ctx: Context, models: dict[str, Path], merges: dict[str, dict],
               evaluate: Evaluator) -> dict[str, Any]:
    """Every pruning row of the report (see the module docstring); the results' `pruning` key.

    `merges` is the merge stage's output (task_arithmetic's chosen point and path are reused);
    `evaluate` is `pipeline.score`."""
    settings = SETTINGS[ctx.profile.name]
    tasks = list(ctx.profile.tasks)
    data_dir = ctx.out_dir / "data"
    work = ctx.out_dir / "pruning"
    domain = {t: _write_jsonl(data_dir / f"{t}_prune_domain.jsonl", (e.text for e in ctx.splits[t].train))
              for t in tasks}
    general_lines = general_text(settings.general_lines, ctx.seed, "train").splitlines(keepends=True)
    general = _write_jsonl(data_dir / "prune_general.jsonl", general_lines)

    pruned: dict[str, dict[str, Path]] = {s: {} for s in settings.scores}
    per_score: dict[str, dict[str, Any]] = {}
    for score in settings.scores:
        rows = {}
        for task in tasks:
            path = _prune(settings, models[f"ft:{task}"], score, domain[task], general,
                          work / score / task, ctx.seed)
            pruned[score][task] = path
            rows[task] = _scored(ctx, evaluate, path, [task])
        per_score[score] = _own_task_summary(rows, tasks)
        ctx.log(f"prune {score}: own-task mean {per_score[score]['mean']:.3f}")

    result: dict[str, Any] = {"settings": {**settings.to_dict(), "sparsity": SPARSITY, "targets": list(TARGETS)},
                              "finetunes": per_score, "merged": {}}
    chosen = merges.get(MERGE_METHOD, {})
    if chosen.get("status") != "ok" or "gaprune" not in pruned:
        message = f"needs a successful {MERGE_METHOD} merge and gaprune masks"
        result["merged"] = {key: {"status": "skipped", "message": message}
                            for key in ("pruned_then_merged", "merged_then_pruned")}
        return result
    result["merge_point"] = chosen["chosen"]
    result["merged"]["pruned_then_merged"] = _guarded(lambda: _pruned_then_merged(
        ctx, evaluate, models, pruned["gaprune"], chosen["chosen"], work / "pruned_then_merged"))
    union = _write_jsonl(data_dir / "prune_domain_union.jsonl",
                         (e.text for e in interleave([ctx.splits[t].train for t in tasks])))
    result["merged"]["merged_then_pruned"] = _guarded(lambda: _scored(ctx, evaluate, _prune(
        settings, Path(chosen["path"]), "gaprune", union, general, work / "merged_then_pruned", ctx.seed), tasks))
    for key, row in result["merged"].items():
        ctx.log(f"{key}: {row['status']} {row.get('mean', '')}")
    return result


def _own_task_summary(rows: dict[str, dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """One score's row: each fine-tune's accuracy on its own task, their mean, mean retention."""
    accuracy = {t: rows[t]["accuracy"][t] for t in tasks}
    return {
        "accuracy": accuracy, "mean": sum(accuracy.values()) / len(tasks),
        "general": {k: sum(rows[t]["general"][k] for t in tasks) / len(tasks) for k in ("next_char_accuracy", "loss")},
        "mlp_sparsity": sum(rows[t]["mlp_sparsity"] for t in tasks) / len(tasks),
    }


def _pruned_then_merged(ctx: Context, evaluate: Evaluator, models: dict[str, Path], masks: dict[str, Path],
                        chosen: dict[str, Any], out: Path) -> dict[str, Any]:
    tasks = list(ctx.profile.tasks)
    config = merge_config(MERGE_METHOD, models["base"], [models[f"ft:{t}"] for t in tasks],
                          chosen["parameters"], chosen["model_parameters"], None)
    for entry, task in zip(config["models"], tasks):
        entry["parameters"]["mask"] = str(masks[task] / MASK_FILE)
    return _scored(ctx, evaluate, run_merge(config, out, ctx.seed), tasks)


def _guarded(build) -> dict[str, Any]:
    """A merged row's scores, or its failure as a row (one failing row must not sink the report)."""
    try:
        return {"status": "ok", **build()}
    except FastmergeError as exc:
        return {"status": "failed", "message": str(exc)}


# --- report -------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _merge_point(section: dict[str, Any]) -> str:
    point = section.get("merge_point")
    if point is None:
        return "no successful merge"
    return ", ".join(f"{k}={v}" for k, v in {**point["model_parameters"], **point["parameters"]}.items())


def pruning_table(results: dict[str, Any]) -> str:
    """The markdown section for `results["pruning"]`: one row per score, then the merged rows."""
    section = results["pruning"]
    tasks = list(results["tasks"])
    s = section["settings"]
    lines = [
        f"### Pruning at {_pct(s['sparsity'])}% ({', '.join(s['targets'])} weights, causal-LM statistics: "
        f"{s['num_batches']} batches x {s['batch_size']})",
        "",
        "Fine-tune rows: each `ft:<task>` pruned, scored on its own task's test split (%); general "
        "next-char and MLP sparsity are means over the fine-tunes. Merged rows: "
        f"{MERGE_METHOD} ({_merge_point(section)}, chosen on validation above), scored on every task; "
        "`MLP zeros` is measured on the scored checkpoint.",
        "",
        "| model | " + " | ".join(tasks) + " | mean | general next-char | MLP zeros |",
        "|---" * (len(tasks) + 4) + "|",
    ]

    def row(label: str, scored: dict[str, Any]) -> str:
        cells = [_pct(scored["accuracy"][t]) for t in tasks]
        return (f"| {label} | " + " | ".join(cells) + f" | {_pct(scored['mean'])} | "
                f"{_pct(scored['general']['next_char_accuracy'])} | {_pct(scored['mlp_sparsity'])} |")

    unpruned = [results["models"][f"ft:{t}"] for t in tasks]
    lines.append("| fine-tunes, unpruned | " + " | ".join(_pct(m["accuracy"][t]) for m, t in zip(unpruned, tasks))
                 + f" | {_pct(sum(m['accuracy'][t] for m, t in zip(unpruned, tasks)) / len(tasks))} | "
                 + f"{_pct(sum(m['general']['next_char_accuracy'] for m in unpruned) / len(tasks))} | - |")
    for score, scored in section["finetunes"].items():
        lines.append(row(f"fine-tunes, {score}", scored))
    labels = {"pruned_then_merged": "gaprune, then merged", "merged_then_pruned": "merged, then gaprune"}
    for key, scored in section["merged"].items():
        if scored["status"] == "ok":
            lines.append(row(labels[key], scored))
        else:
            lines.append(f"| {labels[key]} | " + " | ".join("-" for _ in tasks)
                         + f" | - | - | {scored['status']}: {scored['message'][:120]} |")
    return "\n".join(lines)
