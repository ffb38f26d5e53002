"""PNG plots of the results (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_task_bars(results: dict[str, Any], path: Path) -> Path:
    """Grouped bars: test accuracy per task, one bar per model/merge method."""
    plt = _pyplot()
    tasks = list(results["tasks"])
    entries = [("base", results["models"]["base"])]
    entries += [(f"merge {m}", r) for m, r in sorted(results["merges"].items()) if r["status"] == "ok"]
    entries.append(("own fine-tune", {"accuracy": {t: results["models"][f"ft:{t}"]["accuracy"][t] for t in tasks}}))
    width = 0.8 / len(entries)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tasks) + 0.25 * len(entries)), 4.5))
    for i, (label, scored) in enumerate(entries):
        xs = [t + (i - (len(entries) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, [100 * scored["accuracy"][t] for t in tasks], width, label=label)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-task accuracy: merges of all fine-tunes")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_continual(results: dict[str, Any], path: Path) -> Path:
    """Average accuracy over the task sequence: sequential fine-tuning vs merge after each task."""
    plt = _pyplot()
    seq = results["continual"]
    runs = {"sequential fine-tuning": seq["sequential_finetuning"]}
    runs.update({f"merge {m}": r for m, r in sorted(seq["methods"].items()) if r["status"] == "ok"})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = range(1, len(seq["order"]) + 1)
    for label, run in runs.items():
        style = "k-o" if label.startswith("sequential") else "-o"
        ax.plot(steps, [100 * s["average_accuracy"] for s in run["steps"]], style, label=label, markersize=3)
    ax.set_xticks(list(steps), [f"{k}: {t}" for k, t in zip(steps, seq["order"])])
    ax.set_ylabel("average accuracy over seen tasks (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Continual learning")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
