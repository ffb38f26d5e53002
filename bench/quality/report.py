"""Writing the results: results.json (everything), results.md (the tables), and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plots import plot_continual, plot_task_bars
from .pruning import pruning_table


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _params(chosen: dict[str, Any]) -> str:
    merged = {**chosen["model_parameters"], **chosen["parameters"]}
    merged.pop("samples", None)
    return ", ".join(f"{k}={v}" for k, v in merged.items()) or "defaults"


def scores_table(results: dict[str, Any]) -> str:
    """Test exact-match accuracy (%) per task, mean, and general retention per model/merge."""
    tasks = list(results["tasks"])
    lines = ["| model | " + " | ".join(tasks) + " | mean | general next-char | chosen on val |",
             "|---" * (len(tasks) + 4) + "|"]

    def row(label: str, scored: dict[str, Any], note: str) -> str:
        cells = [_pct(scored["accuracy"][t]) for t in tasks]
        general = _pct(scored["general"]["next_char_accuracy"])
        return f"| {label} | " + " | ".join(cells) + f" | {_pct(scored['mean'])} | {general} | {note} |"

    for name, scored in results["models"].items():
        lines.append(row(name.replace(":", " "), scored, ""))
    for method, merged in sorted(results["merges"].items(), key=lambda kv: -kv[1].get("mean", -1)):
        if merged["status"] == "ok":
            lines.append(row(f"merge {method}", merged, _params(merged["chosen"])))
        else:
            lines.append(f"| merge {method} | " + " | ".join("-" for _ in tasks)
                         + f" | - | - | {merged['status']}: {merged['message'][:120]} |")
    return "\n".join(lines)


def continual_table(results: dict[str, Any]) -> str:
    """Average accuracy / forgetting (%) after each step of the task sequence."""
    seq = results["continual"]
    order = seq["order"]
    lines = ["| after step | " + " | ".join(f"{k + 1}: +{t}" for k, t in enumerate(order)) + " |",
             "|---" * (len(order) + 1) + "|"]
    runs = {"sequential fine-tuning": seq["sequential_finetuning"]}
    runs.update({f"merge {m}": r for m, r in seq["methods"].items() if r["status"] == "ok"})
    for label, run in runs.items():
        cells = [f"{_pct(s['average_accuracy'])} / {_pct(s['forgetting'])}" for s in run["steps"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    failed = [f"{m} ({r['message'][:100]})" for m, r in seq["methods"].items() if r["status"] != "ok"]
    if failed:
        lines.append("\nFailed: " + "; ".join(failed))
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    p = results["profile"]
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in results["timings"].items())
    return "\n".join([
        f"## Merge quality ({p['name']} profile, seed {results['seed']})",
        "",
        "Exact-match accuracy (%) on held-out test prompts, greedy decoding. `general next-char` is "
        "next-character accuracy (%) on held-out general text (retention of pre-training). "
        "Merges combine all fine-tunes; their hyper-parameters were chosen on the validation split.",
        "",
        scores_table(results),
        "",
        "### Continual learning: average accuracy / forgetting (%) after each step",
        "",
        continual_table(results),
        "",
        pruning_table(results),
        "",
        f"Timings: {timings}.",
        "",
    ])


def write_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(results))
    return [json_path, md_path, plot_task_bars(results, out_dir / "tasks.png"),
            plot_continual(results, out_dir / "continual.png")]
