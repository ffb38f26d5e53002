"""Per-tensor sparsity report: `sparsity.json` (machine-readable) and `sparsity.png` (a bar chart
per tensor), so a global threshold's uneven spread over layers is visible at a glance."""

from __future__ import annotations

import json
from pathlib import Path

from .mask_file import MaskSet


def sparsity_summary(masks: MaskSet) -> dict:
    """{"overall": {...}, "tensors": {name: {"numel", "kept", "sparsity"}}} in mask order."""
    tensors = {}
    total = kept_total = 0
    for name, shape in masks.shapes.items():
        numel = 1
        for d in shape:
            numel *= d
        kept = masks.kept(name)
        tensors[name] = {"numel": numel, "kept": kept, "sparsity": 1.0 - kept / numel if numel else 0.0}
        total += numel
        kept_total += kept
    overall = {"numel": total, "kept": kept_total, "sparsity": 1.0 - kept_total / total if total else 0.0}
    return {"overall": overall, "tensors": tensors, **masks.info}


def write_report(summary: dict, directory: Path) -> list[str]:
    """Write sparsity.json, and sparsity.png when matplotlib is installed; returns the names."""
    (directory / "sparsity.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    written = ["sparsity.json"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    names = list(summary["tensors"])
    values = [summary["tensors"][n]["sparsity"] for n in names]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.18 * len(names) + 1)))
    ax.barh(range(len(names)), values, color="#4c72b0")
    ax.axvline(summary["overall"]["sparsity"], color="#c44e52", linestyle="--", label="overall")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sparsity (fraction of weights removed)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(directory / "sparsity.png", dpi=110)
    plt.close(fig)
    return written + ["sparsity.png"]
