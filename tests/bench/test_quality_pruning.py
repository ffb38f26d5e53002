"""The merge-quality benchmark's pruning rows, on tiny untrained models (seconds, not minutes)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bench.quality.merging import merge_config, run_merge
from bench.quality.model import ModelShape, new_model
from bench.quality.pipeline import Context, prepare_data, score
from bench.quality.profiles import QUICK
from bench.quality.pruning import MERGE_METHOD, SETTINGS, interleave, mlp_zero_fraction, prune_rows, pruning_table
from bench.quality.tasks import Example
from bench.quality.tokenizer import save_hf_tokenizer
from bench.quality.training import TrainSettings

TINY = dataclasses.replace(
    QUICK, tasks=("reverse", "count"), shape=ModelShape(hidden=32, layers=1, heads=2, intermediate=64),
    pretrain=TrainSettings(steps=1, batch=4, lr=1e-3), general_eval_lines=8, n_train=40, n_val=4, n_test=6,
)


def test_interleave_keeps_every_prefix_balanced():
    a = [Example(f"a{i}", "") for i in range(3)]
    b = [Example(f"b{i}", "") for i in range(1)]
    assert [e.prompt for e in interleave([a, b])] == ["a0", "b0", "a1", "a2"]


def test_mlp_zero_fraction_counts_only_mlp_weights(tmp_path):
    save_file({"model.layers.0.mlp.up_proj.weight": torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
               "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    # masks.safetensors beside the model is metadata, not weights.
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(8, dtype=torch.uint8)},
              str(tmp_path / "masks.safetensors"))
    assert mlp_zero_fraction(tmp_path) == 0.75


def _checkpoint(directory, seed):
    new_model(TINY.shape, seed).save_pretrained(str(directory))
    save_hf_tokenizer(directory)
    return directory


def _context(tmp_path):
    ctx = Context(TINY, 0, tmp_path / "cache", tmp_path / "out", log=lambda msg: None)
    prepare_data(ctx)
    models = {"base": _checkpoint(tmp_path / "base", 0)}
    models.update({f"ft:{t}": _checkpoint(tmp_path / t, 1 + i) for i, t in enumerate(TINY.tasks)})
    return ctx, models


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pruning")
    ctx, models = _context(tmp_path)
    chosen = {"parameters": {"lambda": 0.5}, "model_parameters": {"weight": 1.0}}
    config = merge_config("task_arithmetic", models["base"], [models[f"ft:{t}"] for t in TINY.tasks],
                          chosen["parameters"], chosen["model_parameters"], None)
    merged = run_merge(config, tmp_path / "merged", 0)
    merges = {"task_arithmetic": {"status": "ok", "chosen": chosen, "path": str(merged)}}
    return ctx, models, prune_rows(ctx, models, merges, score)


def test_every_score_prunes_each_finetune_to_half_its_mlp_weights(pruned):
    ctx, _, section = pruned
    assert list(section["finetunes"]) == list(SETTINGS["quick"].scores)
    for score_name, row in section["finetunes"].items():
        assert set(row["accuracy"]) == set(TINY.tasks)
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
        assert 0.0 < row["general"]["next_char_accuracy"] <= 1.0
        # Untrained weights have no exact zeros, so the zeros are exactly the pruned half.
        assert row["mlp_sparsity"] == pytest.approx(0.5, abs=1e-3), score_name
        for task in TINY.tasks:
            assert (ctx.out_dir / "pruning" / score_name / task / "masks.safetensors").is_file()
    domain = (ctx.out_dir / "data" / "reverse_prune_domain.jsonl").read_text().splitlines()
    # The domain data is what the fine-tune learned: prompt, answer and the closing newline.
    assert json.loads(domain[0]) == ctx.splits["reverse"].train[0].text


def test_merged_rows_score_every_task_and_only_merged_then_pruned_is_sparse(pruned):
    _, _, section = pruned
    first, second = section["merged"]["pruned_then_merged"], section["merged"]["merged_then_pruned"]
    for row in (first, second):
        assert row["status"] == "ok" and set(row["accuracy"]) == set(TINY.tasks)
    assert second["mlp_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # Masked task vectors fall back to the base, which is dense.
    assert first["mlp_sparsity"] < 0.01


def test_pruned_then_merged_differs_from_the_unmasked_merge(pruned, tmp_path):
    ctx, models, _ = pruned
    config = merge_config(MERGE_METHOD, models["base"], [models[f"ft:{t}"] for t in TINY.tasks],
                          {"lambda": 0.5}, {"weight": 1.0}, None)
    unmasked = run_merge(config, tmp_path / "unmasked", 0)
    masked = ctx.out_dir / "pruning" / "pruned_then_merged"
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(_tensor(masked, name), _tensor(unmasked, name))


def _tensor(checkpoint, name):
    for shard in checkpoint.glob("model*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


def test_table_lists_every_row(pruned):
    ctx, models, section = pruned
    fake_model = {"accuracy": {t: 0.5 for t in TINY.tasks}, "general": {"next_char_accuracy": 0.4}}
    results = {"tasks": {t: "" for t in TINY.tasks}, "pruning": section,
               "models": {f"ft:{t}": fake_model for t in TINY.tasks}}
    table = pruning_table(results)
    for label in ("fine-tunes, unpruned", *(f"fine-tunes, {s}" for s in section["finetunes"]),
                  "gaprune, then merged", "merged, then gaprune"):
        assert f"| {label} |" in table
    assert "weight=1.0, lambda=0.5" in table  # the merge point the merged rows reused


def test_merged_rows_are_skipped_without_a_task_arithmetic_merge(tmp_path, monkeypatch):
    ctx, models = _context(tmp_path)
    monkeypatch.setitem(SETTINGS, "quick", dataclasses.replace(SETTINGS["quick"], scores=("magnitude",)))
    section = prune_rows(ctx, models, {"task_arithmetic": {"status": "failed", "message": "boom"}}, score)
    assert {row["status"] for row in section["merged"].values()} == {"skipped"}
    assert "skipped" in pruning_table({"tasks": {t: "" for t in TINY.tasks}, "pruning": section, "models": {
        f"ft:{t}": {"accuracy": {t: 0.0}, "general": {"next_char_accuracy": 0.1}} for t in TINY.tasks}})
