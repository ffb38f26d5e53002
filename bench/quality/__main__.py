"""`python -m bench.quality [--quick] [--out DIR] [--cache-dir DIR] [--seed N]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cache import default_cache_dir
from .pipeline import run_benchmark
from .profiles import FULL, QUICK
from .report import write_report

DEFAULT_OUT = Path("bench/results/quality")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small models and data (CI smoke test, ~3 min)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="trained-model cache (default $FASTMERGE_QUALITY_CACHE or ~/.cache/fastmerge/quality)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    results = run_benchmark(profile, args.out, args.cache_dir or default_cache_dir(), args.seed,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True))
    for path in write_report(results, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
