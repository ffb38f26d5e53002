"""End-to-end `prune` on a tiny Llama: exact sparsity, masks applied, bad data rejected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _support import load_dir, write_adapter, write_config
from fastmerge.errors import ConfigError, FastmergeError
from fastmerge.io.lora import open_model
from fastmerge.pruning import load_masks, prune
from fastmerge.pruning.config import load_prune_config
from fastmerge.pruning.targets import is_target


def _config(model: Path | str, data: dict, **extra) -> dict:
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


@pytest.mark.parametrize("score", ["gaprune", "magnitude"])
def test_a_lora_reference_is_pruned_as_the_model_with_its_adapter_merged(tiny_model, text_data, tmp_path, score):
    """`model: base+adapter` scores, masks and writes the adapted model: the same files as pruning
    a copy of the model with the adapter merged (what `AdaptedCheckpoint` reads)."""
    g = torch.Generator().manual_seed(3)
    adapter = write_adapter(tmp_path / "adapter", {
        f"model.layers.{i}.mlp.{proj}.lora_{side}.weight": torch.randn(shape, generator=g) * (0.3 if side == "B" else 1.0)
        for i in (0, 2) for proj, (out, inp) in {"up_proj": (72, 32), "down_proj": (32, 72)}.items()
        for side, shape in (("A", (4, inp)), ("B", (out, 4)))})
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model, merged, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    adapted = open_model(f"{tiny_model}+{adapter}")
    save_file({name: adapted.tensor(name).contiguous() for name in adapted.names}, str(merged / "model.safetensors"))
    adapted.close()
    from_reference = prune(_config(f"{tiny_model}+{adapter}", text_data, score=score), tmp_path / "a", device="cpu")
    from_copy = prune(_config(merged, text_data, score=score), tmp_path / "b", device="cpu")
    ours, theirs = load_masks(from_reference.output_dir), load_masks(from_copy.output_dir)
    assert all(torch.equal(ours.packed[n], theirs.packed[n]) for n in theirs.packed) and ours.packed.keys() == theirs.packed.keys()
    pruned, expected = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert pruned.keys() == expected.keys() and all(torch.equal(pruned[n], expected[n]) for n in expected)
    assert not torch.equal(pruned["model.layers.0.mlp.up_proj.weight"], load_dir(tiny_model)["model.layers.0.mlp.up_proj.weight"])


def test_a_prune_config_resolves_both_parts_of_a_lora_reference_next_to_it(tmp_path):
    (tmp_path / "model").mkdir()
    config = write_config(tmp_path / "prune.yml", {"model": "model+adapter", "score": "magnitude"})
    cfg = load_prune_config(config)
    assert (cfg.model, cfg.adapter, cfg.reference) == (tmp_path / "model", tmp_path / "adapter", f"{tmp_path / 'model'}+{tmp_path / 'adapter'}")
    with pytest.raises(ConfigError, match="MODEL\\+ADAPTER"):
        load_prune_config({"model": "a+b+c"})


@pytest.mark.parametrize("score, broken", [
    ("magnitude", "model.layers.1.mlp.up_proj.weight"),
    # a NaN outside the targets makes every gradient NaN: the weight is still the one named
    ("gaprune", "model.layers.0.post_attention_layernorm.weight"),
])
def test_a_nan_weight_is_named_with_its_model(tmp_path, text_data, score, broken):
    from _support import TINY
    from fastmerge.demo import make_state, write_checkpoint
    from fastmerge.errors import CheckpointError

    state = make_state(TINY, seed=0)
    state[broken] = state[broken].clone()
    state[broken].view(-1)[5] = float("nan")
    model = write_checkpoint(tmp_path / "nan_model", state, TINY)
    with pytest.raises(CheckpointError, match=f"tensor {broken} of model {model} \\(.*model.safetensors\\) holds NaN"):
        prune(_config(model, text_data, score=score), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_non_finite_statistics_are_named_when_the_weights_are_finite(tiny_model):
    from fastmerge.errors import PlanError
    from fastmerge.io.checkpoint import Checkpoint
    from fastmerge.pruning.prune import finite_scores

    cfg = load_prune_config(_config(tiny_model, {"domain": "d.jsonl", "general": "g.txt"}))
    name = "model.layers.0.mlp.up_proj.weight"
    with Checkpoint(tiny_model) as checkpoint:
        with pytest.raises(PlanError, match=f"gaprune scores of tensor {name} of model {tiny_model} are not finite"):
            finite_scores(cfg, checkpoint, lambda n, theta: theta.float() * float("nan"), name)
        torch.testing.assert_close(finite_scores(cfg, checkpoint, lambda n, theta: theta.float().abs(), name),
                                   checkpoint.tensor(name).float().abs())
