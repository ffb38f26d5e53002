"""Every build of the native kernels in this installation, timed on the same merges.

A portable install (`pip install . -C cmake.define.FASTMERGE_NATIVE_ARCH=OFF`) carries one build
per x86-64 level, and the CPU gets the fastest it can run (fastmerge/native_loader.py); this shows
what each level costs on the machine at hand, and that every level writes the same bytes. For each
method, `fastmerge run` (a child process, as in bench.e2e) runs once per build in turn
(FASTMERGE_NATIVE_VARIANT), for `--repeat` rounds, so the machine's noise falls on all builds
alike; it prints each build's median wall time, its ratio to the default build's, and whether
its output has the default build's sha256. Builds this CPU cannot run are listed and skipped.

Run: `python -m bench.variants --preset 1b --work /tmp/fm-bench --methods ties,dare_ties,della --repeat 3`
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
from pathlib import Path

import yaml

from bench.checkpoints import add_generator_args, generate, model_files, spec_from_args
from bench.e2e import METHODS, config_inputs, fastmerge_command, read_files, run_child
from fastmerge import _cpu
from fastmerge._native_variants import VARIANTS
from fastmerge.native_loader import VARIANT_VARIABLE, runnable_variants


def output_digest(directory: Path) -> str:
    """One sha256 over the output's tensor files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as f:
            while block := f.read(64 << 20):
                digest.update(block)
    return digest.hexdigest()


def time_builds(config_path: Path, inputs: list[Path], work: Path, builds: list[str], repeat: int) -> dict:
    """{build: (wall times, output sha256)} for one config, the builds interleaved per round."""
    walls: dict[str, list[float]] = {build: [] for build in builds}
    digests: dict[str, str] = {}
    out = work / "out-variants"
    for _ in range(repeat):
        for build in builds:
            shutil.rmtree(out, ignore_errors=True)
            read_files(model_files(inputs))  # warm the page cache, as bench.e2e does
            run = run_child("fastmerge", config_path.stem, fastmerge_command(config_path, out),
                            env={**os.environ, VARIANT_VARIABLE: build})
            if run.returncode != 0:
                raise SystemExit(f"{build} failed on {config_path.stem}:\n{run.log_tail}")
            walls[build].append(run.wall_s)
            digests.setdefault(build, output_digest(out))
    shutil.rmtree(out, ignore_errors=True)
    return {build: (walls[build], digests[build]) for build in builds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_generator_args(parser)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fm-bench"), help="where models and outputs go (not the repo)")
    parser.add_argument("--methods", default="ties,dare_ties,della", help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the builds; medians are reported [3]")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    builds = runnable_variants(VARIANTS, _cpu.supports)
    skipped = [name for name, _ in VARIANTS if name not in builds]
    print(f"builds: {', '.join(builds)}" + (f" (this CPU cannot run {', '.join(skipped)})" if skipped else ""))
    models = generate(args.work / ("custom" if args.custom else args.preset), spec_from_args(args))

    print(f"{'method':<14}{'build':<22}{'median s':>9}{'x default':>11}  same bytes  (walls)")
    for method in methods:
        config = METHODS[method](models)
        config_path = args.work / f"{method}.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        results = time_builds(config_path, config_inputs(config), args.work, builds, args.repeat)
        default_median = statistics.median(results[builds[0]][0])
        for build, (walls, digest) in results.items():
            median = statistics.median(walls)
            same = "yes" if digest == results[builds[0]][1] else "NO"
            print(f"{method:<14}{build:<22}{median:>9.2f}{median / default_median:>10.2f}x  {same:<10}  "
                  f"({', '.join(f'{w:.2f}' for w in walls)})", flush=True)


if __name__ == "__main__":
    main()
