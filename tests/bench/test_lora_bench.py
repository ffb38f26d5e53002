"""The LoRA benchmarks on a small set: an adapter fastmerge applies, both merges run, the
extraction timed both ways with the randomized SVD's error against the exact one, JSON files."""

from __future__ import annotations

import json

import torch

from bench import lora, lora_extract
from bench.checkpoints import GeneratorSpec, generate
from fastmerge.demo import LlamaShape
from fastmerge.io.lora import open_model

SHAPE = LlamaShape(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)


def test_the_adapter_updates_every_linear_layer_by_about_a_percent(tmp_path):
    models = generate(tmp_path / "models", GeneratorSpec(SHAPE, fine_tunes=2))
    adapter = lora.write_adapter(tmp_path / "adapter", SHAPE, rank=4)
    adapted, plain = open_model(f"{models.fine_tunes[0]}+{adapter}"), open_model(str(models.fine_tunes[0]))
    assert len(adapted.updates) == 7 * SHAPE.num_hidden_layers
    name = "model.layers.1.mlp.down_proj.weight"
    change = (adapted.tensor(name).float() - plain.tensor(name).float()).norm() / plain.tensor(name).float().norm()
    assert 0 < change < 0.2
    assert torch.equal(adapted.tensor("model.norm.weight"), plain.tensor("model.norm.weight"))


def test_the_benchmark_runs_both_fastmerge_merges(tmp_path, capsys):
    lora.main(["--custom", "64,160,2,4,2,96", "--fine-tunes", "2", "--rank", "4", "--work", str(tmp_path), "--no-mergekit"])
    report = json.loads((tmp_path / "lora-custom.json").read_text())
    assert set(report["runs"]) == {"lora", "plain"}
    assert all(run["returncode"] == 0 and run["wall_s"] > 0 and run["peak_rss_bytes"] > 0 for run in report["runs"].values())
    assert report["adapter_bytes"] > 0 and "applying it costs fastmerge" in capsys.readouterr().out


def test_the_extraction_benchmark_runs_both_svds(tmp_path, capsys):
    lora_extract.main(["--custom", "64,160,2,4,2,96", "--fine-tunes", "1", "--max-rank", "4", "--work", str(tmp_path),
                       "--no-mergekit", "--error-matrices", "3"])
    report = json.loads((tmp_path / "lora-extract.json").read_text())
    assert set(report["runs"]) == {"fastmerge exact", "fastmerge randomized"}
    assert len(report["error_ratios"]) == 3 and all(ratio >= 0.999 for ratio in report["error_ratios"])
    assert "randomized / exact error" in capsys.readouterr().out
