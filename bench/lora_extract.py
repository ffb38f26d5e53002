"""LoRA extraction timed: fastmerge (exact and randomized SVD) against mergekit-extract-lora.

For a generated set (bench.checkpoints) the first fine-tune is extracted against the base, each
run in a fresh process; or, with `--model` and `--base-model`, any pair of checkpoints (a real
fine-tune's task vector has a decaying spectrum; the generated ones are noise, the randomized
SVD's hardest case). Prints wall time and peak RSS, and for the randomized SVD how much larger
its error ||D - B A|| is than the exact SVD's (the best possible at that rank), per matrix.
Run: `python -m bench.lora_extract --preset 1b --work /tmp/fm-bench --max-rank 64`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


from bench.checkpoints import generate, spec_from_args
from bench.e2e import MERGEKIT_YAML, comparison_parser, run_child
from fastmerge.extraction import low_rank_factors
from fastmerge.io.lora import open_model
from fastmerge.ops.random import derive_key


def fastmerge_command(model: Path, base: Path, out: Path, rank: int, svd: str) -> list[str]:
    return [sys.executable, "-m", "fastmerge", "extract-lora", "--model", str(model), "--base-model", str(base),
            "--out-path", str(out), "--max-rank", str(rank), "--svd", svd, "--quiet"]


def mergekit_command(model: Path, base: Path, out: Path, rank: int) -> list[str]:
    extract = MERGEKIT_YAML.parent / "mergekit-extract-lora"
    return [str(extract), "--model", str(model), "--base-model", str(base), "--out-path", str(out),
            "--max-rank", str(rank), "--no-write-model-card", "--quiet"]


def error_ratios(model: Path, base: Path, rank: int, limit: int) -> list[float]:
    """||D - BA|| of the randomized SVD over the exact SVD's, for the first `limit` matrices
    that are factored (not embeddings)."""
    tuned, original = open_model(str(model)), open_model(str(base))
    ratios = []
    for name in tuned.names:
        if len(ratios) == limit:
            break
        if not name.endswith("proj.weight"):
            continue
        delta = tuned.tensor(name).float() - original.tensor(name).float()
        exact = low_rank_factors(delta, rank)
        fast = low_rank_factors(delta, rank, svd="randomized", seed=derive_key(0, name, 0))
        best = (delta - exact[1] @ exact[0]).norm()
        ratios.append(float((delta - fast[1] @ fast[0]).norm() / best) if best > 0 else 1.0)
    return ratios


def main(argv: list[str] | None = None) -> None:
    parser = comparison_parser(__doc__)
    parser.add_argument("--model", type=Path, default=None, help="a fine-tune to extract instead of a generated one")
    parser.add_argument("--base-model", type=Path, default=None, help="its base (with --model)")
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--error-matrices", type=int, default=8, help="matrices to compare the two SVDs' errors on [8]")
    parser.add_argument("--json", type=Path, default=None, help="results file [default: WORK/lora-extract.json]")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.base_model is None):
        parser.error("--model and --base-model go together")
    if args.model is None:
        models = generate(args.work / ("custom" if args.custom else args.preset), spec_from_args(args))
        model, base = models.fine_tunes[0], models.base
    else:
        model, base = args.model, args.base_model
    out = args.work / "lora-extract-out"
    commands = {f"fastmerge {svd}": fastmerge_command(model, base, out, args.max_rank, svd) for svd in ("exact", "randomized")}
    if args.mergekit and (MERGEKIT_YAML.parent / "mergekit-extract-lora").exists():
        commands["mergekit"] = mergekit_command(model, base, out, args.max_rank)
    runs = {}
    for label, command in commands.items():
        shutil.rmtree(out, ignore_errors=True)
        run = run_child(label.split()[0], "extract-lora", command)
        if run.returncode != 0:
            raise SystemExit(f"{label} failed:\n{run.log_tail}")
        runs[label] = run
        print(f"{label:>20}: {run.wall_s:7.1f} s, peak RSS {run.peak_rss_bytes / 1e9:.2f} GB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    ratios = error_ratios(model, base, args.max_rank, args.error_matrices)
    print(f"randomized / exact error over {len(ratios)} matrices: {min(ratios):.4f} - {max(ratios):.4f}")
    report = {"model": str(model), "base": str(base), "max_rank": args.max_rank, "error_ratios": ratios,
              "runs": {label: {"wall_s": r.wall_s, "peak_rss_bytes": r.peak_rss_bytes} for label, r in runs.items()}}
    path = args.json or args.work / "lora-extract.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
