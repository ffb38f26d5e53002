"""FDA ablation on the merge-quality models: which of FDA's parts carry its score.

Merges all fine-tunes with FDA at a few settings around the benchmark's choice and prints each
one's validation and test means and per-task test accuracy, as a markdown table. The models come
from the benchmark's cache (trained first if missing, as `python -m bench.quality` would).
The benchmark itself picks FDA's setting on validation from `merging.GRIDS`; this reports test
scores of the other settings too, so it is a diagnosis, not a selection.

Run: python -m bench.quality.fda_ablation [--quick] [--cache-dir D] [--out D] [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .merging import merge_config, run_merge
from .pipeline import add_study_args, score, study_models

CHOSEN = {"lambda": 0.3, "ridge": 0.1}
SETTINGS = {
    "lambda 0.3, ridge 0.1 (the benchmark's choice)": CHOSEN,
    "no anchor steps (anchors = sampled rows)": {**CHOSEN, "steps": 0},
    "gaussian anchor init": {**CHOSEN, "anchor_init": "gaussian"},
    "start from the base": {**CHOSEN, "init_merge": "base"},
    "8 anchors per task": {**CHOSEN, "anchors": 8},
    "ridge 1.0": {**CHOSEN, "ridge": 1.0},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality.fda_ablation", description=__doc__.split("\n\n")[0])
    add_study_args(parser, Path("/tmp/fastmerge-fda-ablation"))
    args = parser.parse_args(argv)
    ctx, models = study_models(args)
    profile = ctx.profile
    finetunes = [models[f"ft:{t}"] for t in profile.tasks]
    rows = {}
    print(f"| FDA setting | val mean | test mean | {' | '.join(profile.tasks)} |")
    print("|---|---|---|" + "---|" * len(profile.tasks))
    for label, params in SETTINGS.items():
        config = merge_config("fda", models["base"], finetunes, params, {"weight": 1.0}, None)
        merged = run_merge(config, ctx.out_dir / "merge", args.seed)
        val = score(ctx, merged, "val", retention=False)["mean"]
        test = score(ctx, merged, "test", retention=False)
        rows[label] = {"parameters": params, "val_mean": val, "test_mean": test["mean"], "test": test["accuracy"]}
        cells = " | ".join(f"{100 * test['accuracy'][t]:.1f}" for t in profile.tasks)
        print(f"| {label} | {100 * val:.1f} | {100 * test['mean']:.1f} | {cells} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
