"""End-to-end `prune` on a tiny Llama: exact sparsity, masks applied, bad data rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _support import load_dir
from fastmerge.errors import FastmergeError
from fastmerge.pruning import load_masks, prune
from fastmerge.pruning.targets import is_target


def _config(model: Path, data: dict, **extra) -> dict:
    return {"model": str(model), "data": data, "batch_size": 2, "num_batches": 2, "max_length": 16, **extra}


@pytest.mark.parametrize("score", ["gaprune", "fisher", "magnitude", "random"])
def test_global_sparsity_is_exact_and_masks_are_applied(tiny_model, text_data, tmp_path, score):
    out = tmp_path / "pruned"
    report = prune(_config(tiny_model, text_data, score=score, sparsity=0.3), out, device="cpu")
    before, after = load_dir(tiny_model), load_dir(out)
    masks = load_masks(out)
    targeted = [n for n, t in before.items() if is_target(n, t.shape, ["mlp"])]
    assert sorted(masks.shapes) == sorted(targeted) and all(".mlp." in n for n in targeted)
    total = sum(before[n].numel() for n in targeted)
    assert report.targeted == total and report.kept == int(0.7 * total)
    for name, tensor in before.items():
        if name in masks.shapes:
            keep = masks.dense(name)
            assert torch.equal(after[name][keep], tensor[keep]) and not after[name][~keep].any()
        else:
            assert torch.equal(after[name], tensor)
    assert {"sparsity.json", "sparsity.png", "masks.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_per_tensor_and_two_four(tiny_model, tmp_path):
    per = prune({"model": str(tiny_model), "score": "magnitude", "sparsity": 0.5, "budget": "per_tensor"}, tmp_path / "a", device="cpu")
    masks = load_masks(per.output_dir)
    for name, shape in masks.shapes.items():
        assert masks.kept(name) == int(0.5 * shape[0] * shape[1])
    two_four = prune({"model": str(tiny_model), "score": "magnitude", "structure": "2:4"}, tmp_path / "b", device="cpu")
    masks = load_masks(two_four.output_dir)
    for name in masks.shapes:
        assert (masks.dense(name).reshape(-1, 4).sum(1) == 2).all()


def test_gaprune_differs_from_magnitude(tiny_model, text_data, tmp_path):
    g = load_masks(prune(_config(tiny_model, text_data), tmp_path / "g", device="cpu").output_dir)
    m = load_masks(prune(_config(tiny_model, text_data, score="magnitude"), tmp_path / "m", device="cpu").output_dir)
    assert any(not torch.equal(g.packed[n], m.packed[n]) for n in g.packed)


def test_empty_and_gradient_free_data(tiny_model, text_data, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(FastmergeError, match="empty.txt is empty"):
        prune(_config(tiny_model, {**text_data, "domain": str(tmp_path / "empty.txt")}), tmp_path / "o1", device="cpu")
    (tmp_path / "single.txt").write_text("a\nb\n")  # one token each: nothing to predict
    with pytest.raises(FastmergeError, match="nothing to learn|anything to learn"):
        prune(_config(tiny_model, {**text_data, "general": str(tmp_path / "single.txt")}), tmp_path / "o2", device="cpu")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
