"""LoRA extraction on the merge-quality models: how much of each fine-tune a rank-r adapter keeps.

For every task's fine-tune, `fastmerge.extract_lora` factors its task vector at a few ranks
(exact and randomized SVD); the adapter is applied back to the base as a LoRA reference
(`base+adapter`, a one-model linear merge) and scored on the task's test split, beside the full
fine-tune and the base. Prints a markdown table of test exact match (%). The models come from
the benchmark's cache (trained first if missing, as `python -m bench.quality` would).

Run: python -m bench.quality.lora_extraction [--quick] [--ranks 2,8,32] [--cache-dir D] [--out D] [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import fastmerge

from .merging import run_merge
from .pipeline import Context, add_study_args, score, study_models


def adapted(base: Path, finetune: Path, rank: int, svd: str, work: Path, seed: int) -> Path:
    """The base with the rank-`rank` adapter of `finetune` applied, as a checkpoint."""
    adapter = work / "adapter"
    fastmerge.extract_lora(finetune, base, adapter, overwrite=True, max_rank=rank, svd=svd, seed=seed, device="cpu")
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
    return run_merge(config, work / "merged", seed)


def accuracy(ctx: Context, path: Path, task: str) -> float:
    return score(ctx, path, "test", retention=False, tasks=[task])["accuracy"][task]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality.lora_extraction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="2,8,32", help="comma-separated ranks [2,8,32]")
    add_study_args(parser, Path("/tmp/fastmerge-lora-extraction"))
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    ctx, models = study_models(args)
    profile = ctx.profile
    columns = [f"rank {r} {svd}" for r in ranks for svd in ("exact", "randomized")]
    print(f"| task | base | fine-tune | {' | '.join(columns)} |")
    print("|---|---|---|" + "---|" * len(columns))
    rows = {}
    for task in profile.tasks:
        row = {"base": accuracy(ctx, models["base"], task), "fine-tune": accuracy(ctx, models[f"ft:{task}"], task)}
        for rank in ranks:
            for svd in ("exact", "randomized"):
                merged = adapted(models["base"], models[f"ft:{task}"], rank, svd, ctx.out_dir, args.seed)
                row[f"rank {rank} {svd}"] = accuracy(ctx, merged, task)
        rows[task] = row
        print(f"| {task} | " + " | ".join(f"{100 * value:.1f}" for value in row.values()) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"ranks": ranks, "test_accuracy": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
