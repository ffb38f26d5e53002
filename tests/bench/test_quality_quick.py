"""End-to-end smoke test of the merge-quality benchmark in its quick mode (runs in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _support import REPO


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--quick", "--out", str(out), "--cache-dir", str(cache)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("results.json", "results.md", "tasks.png", "continual.png"):
        assert (out / name).stat().st_size > 0, name

    results = json.loads((out / "results.json").read_text())
    from fastmerge.methods import method_names

    tasks = list(results["tasks"])
    assert len(tasks) >= 2
    assert set(results["merges"]) == set(method_names())
    assert set(results["models"]) == {"base", *(f"ft:{t}" for t in tasks)}
    scored = list(results["models"].values()) + [m for m in results["merges"].values() if m["status"] == "ok"]
    assert any(m["status"] == "ok" for m in results["merges"].values())
    for entry in scored:
        assert set(entry["accuracy"]) == set(tasks)
        assert all(0.0 <= a <= 1.0 for a in entry["accuracy"].values())
        assert 0.0 < entry["general"]["next_char_accuracy"] <= 1.0
    for merged in results["merges"].values():
        if merged["status"] == "ok":
            assert merged["grid"] and max(g["val_mean"] for g in merged["grid"]) == next(
                g["val_mean"] for g in merged["grid"] if g["parameters"] == merged["chosen"]["parameters"]
                and g["model_parameters"] == merged["chosen"]["model_parameters"])
    sequential = results["continual"]["sequential_finetuning"]["steps"]
    assert [s["task"] for s in sequential] == tasks
    table = (out / "results.md").read_text()
    assert "| base |" in table and "sequential fine-tuning" in table
    for method in results["merges"]:
        assert f"merge {method} |" in table

    # The checkpoints are real HF checkpoints: sharded safetensors, config and tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(results["checkpoints"]["base"])
    assert len(list(base.glob("*.safetensors"))) > 1 and (base / "model.safetensors.index.json").is_file()
    AutoTokenizer.from_pretrained(base)
    AutoModelForCausalLM.from_pretrained(base)

    # The LoRA extraction study runs on the same cached models (no training again).
    extraction = tmp_path / "extraction.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.quality.lora_extraction", "--quick", "--ranks", "2", "--cache-dir", str(cache),
         "--out", str(tmp_path / "extraction"), "--json", str(extraction)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(extraction.read_text())["test_accuracy"]
    assert list(rows) == tasks
    for task, row in rows.items():
        assert list(row) == ["base", "fine-tune", "rank 2 exact", "rank 2 randomized"]
        assert all(0.0 <= value <= 1.0 for value in row.values())
        assert row["fine-tune"] == results["models"][f"ft:{task}"]["accuracy"][task]


@pytest.mark.slow
def test_training_is_reproducible_by_seed(tmp_path):
    """Retraining the quick base from scratch gives byte-identical weights."""
    from bench.quality.pipeline import Context, train_base
    from bench.quality.profiles import QUICK

    def weights(cache: Path) -> dict[str, bytes]:
        ctx = Context(QUICK, seed=5, cache_dir=cache, out_dir=tmp_path / "unused", log=lambda _: None)
        path, _ = train_base(ctx)
        return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}

    assert weights(tmp_path / "a") == weights(tmp_path / "b")
