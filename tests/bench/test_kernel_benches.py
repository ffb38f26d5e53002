"""The kernel benchmarks in bench/kernels run: every benchmark function, at 65537 elements
(an odd size) and with benchmarking kept short, so a change to an op's signature or to a shared
fixture breaks CI instead of the next person who measures. pytest's default collection skips them
(bench_*.py), so nothing else runs them; their timings are not checked here."""

from __future__ import annotations

import os
import subprocess
import sys

from _support import REPO


def test_every_kernel_benchmark_runs_at_a_small_size():
    benches = sorted(str(p.relative_to(REPO)) for p in (REPO / "bench" / "kernels").glob("bench_*.py"))
    assert len(benches) >= 6
    env = {**os.environ, "FASTMERGE_BENCH_N": "65537", "FASTMERGE_BENCH_FDA_SHAPE": "64,96"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *benches,
                           "--benchmark-only", "--benchmark-max-time=0.05"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]
