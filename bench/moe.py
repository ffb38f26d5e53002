"""MoE build benchmark: `fastmerge moe` against mergekit-moe on the same config, in one run.

On a generated checkpoint set (bench.checkpoints) it builds a Mixtral MoE whose experts are the
base and every fine-tune (gate_mode random, both seeded with 0, or `--gate-mode hidden` and the
other prompt modes, which run the base model on two prompts per expert), each build in a fresh process
(peak RSS from GNU time, as in bench.e2e), then checks that the two outputs hold the same bytes.
mergekit-moe loads the base model's tokenizer even for random gates, and the generated sets have
none, so a character tokenizer is saved beside the base first (fastmerge.representations.toy).
The page cache is warmed by an untimed read of the inputs before the runs.

Run: `python -m bench.moe --preset 1b --work /tmp/fm-bench --repeat 3` (`--no-mergekit` to skip it;
`--gate-mode hidden` for routers from the base model's hidden states).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

from bench.checkpoints import generate, model_files, spec_from_args
from bench.e2e import (MERGEKIT_YAML, compare_outputs, comparison_parser, identical, median_run, output_bytes, read_files,
                       run_child)
from fastmerge.moe.config import PROMPT_MODES

MERGEKIT_MOE = MERGEKIT_YAML.with_name("mergekit-moe")


def moe_config(base: Path, experts: list[Path], gate_mode: str = "random") -> dict:
    prompts = gate_mode in PROMPT_MODES
    return {"base_model": str(base), "gate_mode": gate_mode, "dtype": "bfloat16", "experts_per_token": 2,
            "experts": [{"source_model": str(e), **({"positive_prompts": [f"expert {i} prompt", f"a longer prompt for {i}"]}
                                                     if prompts else {})} for i, e in enumerate(experts)]}


def main(argv: list[str] | None = None) -> None:
    parser = comparison_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=1, help="fastmerge builds to take the median of [1]")
    parser.add_argument("--gate-mode", default="random", choices=("random", *PROMPT_MODES), help="router initialisation [random]")
    args = parser.parse_args(argv)
    label = "custom" if args.custom else args.preset
    models = generate(args.work / label, spec_from_args(args))
    if not (models.base / "tokenizer.json").is_file():
        from fastmerge.representations.toy import save_char_tokenizer

        save_char_tokenizer(models.base)
    config = args.work / f"moe-{label}.yml"
    config.write_text(yaml.safe_dump(moe_config(models.base, models.all_models, args.gate_mode)))
    read_files(model_files(models.all_models))  # warm the page cache, untimed
    ours, theirs = args.work / f"moe-{label}-fastmerge", args.work / f"moe-{label}-mergekit"
    runs = [run_child("fastmerge", "moe", [sys.executable, "-m", "fastmerge", "moe", str(config), str(ours),
                                            "--quiet", "--overwrite"]) for _ in range(args.repeat)]
    summary = median_run(runs)
    if summary.returncode:
        sys.exit(f"fastmerge moe failed:\n{summary.log_tail}")
    wall, rss = summary.wall_s, summary.peak_rss_bytes
    size = output_bytes(ours)
    print(f"{len(models.all_models)} experts, {size / 1e9:.2f} GB written: fastmerge {wall:.1f} s "
          f"({', '.join(f'{r.wall_s:.1f}' for r in runs)}), peak RSS {rss / 1e9:.2f} GB")
    if args.mergekit and MERGEKIT_MOE.exists():
        shutil.rmtree(theirs, ignore_errors=True)
        mk = run_child("mergekit", "moe", [str(MERGEKIT_MOE), str(config), str(theirs), "--random-seed", "0",
                                           "--no-write-model-card", "--quiet"])
        if mk.returncode:
            sys.exit(f"mergekit-moe failed:\n{mk.log_tail}")
        print(f"mergekit-moe {mk.wall_s:.1f} s, peak RSS {mk.peak_rss_bytes / 1e9:.2f} GB: fastmerge "
              f"{mk.wall_s / wall:.1f}x faster, {mk.peak_rss_bytes / rss:.1f}x less memory; "
              f"same bytes: {'yes' if identical(compare_outputs(ours, theirs)) else 'NO'}")


if __name__ == "__main__":
    main()
