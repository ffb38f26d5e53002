"""bench/rss_scaling.py builds the sizes it is asked for (models that differ only in their layer
count) and refuses sizes it cannot build."""

from __future__ import annotations

import subprocess
import sys

from _support import REPO


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/rss_scaling.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_two_sizes_give_two_models_with_the_same_largest_tensor(tmp_path):
    done = run_script("--sizes", "60M", "150MB", "--workdir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert header.split() == ["model", "size", "largest", "tensor", "peak", "RSS"]
    cells = [row.split() for row in rows]
    assert [c[0:2] for c in cells] == [["56.51", "MiB"], ["154.53", "MiB"]]  # one layer, then three
    assert cells[0][2:4] == cells[1][2:4] == ["16", "MiB"]
    assert all(float(c[4]) > 100 and c[5] == "MiB" for c in cells)  # the fastmerge process's own peak
    assert list(tmp_path.iterdir()) == []  # each size's models are removed after its merge


def test_a_size_below_one_layer_or_with_a_bad_unit_is_refused(tmp_path):
    for size, says in (("5M", "below the smallest model of this shape"), ("1GBx", "unknown unit")):
        done = run_script("--sizes", size, "--workdir", str(tmp_path))
        assert done.returncode == 2 and says in done.stderr, done.stderr
