"""bench/variants.py times every build this CPU runs on the same merges and checks that they
write the same bytes (here, with the one build of a default install, a tiny checkpoint set)."""

from __future__ import annotations

import subprocess
import sys

from _support import REPO
from fastmerge import _cpu
from fastmerge._native_variants import VARIANTS


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.variants", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_each_runnable_build_gets_a_row_per_method_with_its_ratio_and_bytes(tmp_path):
    done = run_script("--preset", "tiny", "--work", str(tmp_path), "--methods", "ties,linear", "--repeat", "2")
    assert done.returncode == 0, done.stderr
    builds = [name for name, features in VARIANTS if all(_cpu.supports(f) for f in features)]
    first, header, *rows = done.stdout.strip().splitlines()
    assert first.startswith(f"builds: {', '.join(builds)}")
    assert header.split()[:4] == ["method", "build", "median", "s"]
    cells = [row.split() for row in rows]
    assert [c[:2] for c in cells] == [[method, build] for method in ("ties", "linear") for build in builds]
    assert all(c[4] == "yes" for c in cells)  # every build wrote the default build's bytes
    assert [c[3] for c in cells if c[1] == builds[0]] == ["1.00x", "1.00x"]
    assert all(len(row.split("(")[1].split(",")) == 2 for row in rows)  # one wall time per round
    assert not (tmp_path / "out-variants").exists()


def test_an_unknown_method_is_refused(tmp_path):
    done = run_script("--preset", "tiny", "--work", str(tmp_path), "--methods", "ties,nonsense")
    assert done.returncode == 2 and "unknown methods ['nonsense']" in done.stderr
