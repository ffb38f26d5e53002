"""bench/recall_scale.py on the tiny preset: both captures see every layer of every sample, and
the RECALL merge writes a model."""

from __future__ import annotations

import re
import subprocess
import sys

from _support import REPO


def run_bench(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "bench.recall_scale", *args, "--preset", "tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_layerwise_and_whole_model_capture_agree_on_layers_samples_and_width(tmp_path):
    out = run_bench("capture", str(tmp_path))
    shapes = {mode: tuple(map(int, dims.split(", ")))
              for mode, dims in re.findall(r"^(layerwise|whole): representations \(([\d, ]+)\)$", out, re.M)}
    assert set(shapes) == {"layerwise", "whole"}, out
    layerwise, whole = shapes["layerwise"], shapes["whole"]
    # Layer-by-layer capture pools over tokens; the transformers forward keeps them.
    assert layerwise == (whole[0], whole[1], whole[-1]) and whole[1] == 16
    assert len(re.findall(r"^(layerwise|whole): \d+ s, peak RSS [\d.]+ GiB$", out, re.M)) == 2


def test_the_recall_merge_writes_a_model(tmp_path):
    out = run_bench("merge", str(tmp_path))
    assert re.search(r"^merged \d+ tensors with recall into .*recall-merged", out, re.M), out
    assert (tmp_path / "recall-merged" / "model.safetensors").exists()
    assert (tmp_path / "recall-merged" / "recall_weights.json").exists()
