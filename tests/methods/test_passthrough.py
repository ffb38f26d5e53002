"""passthrough: scaled copies, and a layer-stacking frankenmerge end to end."""

from __future__ import annotations

import json

import pytest
import torch

from _support import load_dir, write_config
from fastmerge import merge_tensors, run
from fastmerge.demo import LlamaShape, fine_tune_of, make_state, write_checkpoint
from fastmerge.errors import ConfigError

SIX_LAYERS = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)


def test_passthrough_copies_or_scales():
    x = torch.randn(5, 7).bfloat16()
    assert torch.equal(merge_tensors("passthrough", [x]), x)
    assert torch.equal(merge_tensors("passthrough", [x], scale=0.5, out_dtype=torch.float32), x.float() * 0.5)


def test_passthrough_takes_one_model():
    with pytest.raises(ConfigError, match="exactly 1 model"):
        merge_tensors("passthrough", [torch.ones(2), torch.ones(2)])


@pytest.fixture
def two_models(tmp_path):
    a = make_state(SIX_LAYERS, seed=0)
    b = fine_tune_of(a, seed=1, scale=0.5)
    return (
        write_checkpoint(tmp_path / "a", a, SIX_LAYERS, max_shard_bytes=30_000),
        write_checkpoint(tmp_path / "b", b, SIX_LAYERS, max_shard_bytes=30_000),
    )


def test_frankenmerge_stacks_layers_byte_for_byte(two_models, tmp_path):
    transformers = pytest.importorskip("transformers")
    a, b = two_models
    config = write_config(tmp_path / "franken.yml", {
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 4]}]},
            {"sources": [{"model": str(b), "layer_range": [2, 6]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
    })
    out = run(config, tmp_path / "merged", quiet=True).output_dir
    merged, source_a, source_b = load_dir(out), load_dir(a), load_dir(b)

    expected = {}
    for layer in range(8):
        source, source_layer = (source_a, layer) if layer < 4 else (source_b, layer - 2)
        prefix, source_prefix = f"model.layers.{layer}.", f"model.layers.{source_layer}."
        for name, tensor in source.items():
            if name.startswith(source_prefix):
                expected[prefix + name[len(source_prefix):]] = tensor
    # Tensors before the layer stack come from the first slice, those after it from the last.
    expected["model.embed_tokens.weight"] = source_a["model.embed_tokens.weight"]
    expected["model.norm.weight"] = source_b["model.norm.weight"]
    expected["lm_head.weight"] = source_b["lm_head.weight"]
    assert sorted(merged) == sorted(expected)
    for name, tensor in expected.items():
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), name

    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 8
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 8
    assert torch.equal(model.model.layers[5].mlp.up_proj.weight, source_b["model.layers.3.mlp.up_proj.weight"])


def test_frankenmerge_scale_per_slice_source(two_models, tmp_path):
    a, b = two_models
    config = write_config(tmp_path / "scaled.yml", {
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b), "layer_range": [2, 3], "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}]},
        ],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
    })
    merged = load_dir(run(config, tmp_path / "merged", quiet=True).output_dir)
    source_b = load_dir(b)
    assert not merged["model.layers.2.self_attn.o_proj.weight"].any()
    assert torch.equal(merged["model.layers.2.self_attn.q_proj.weight"], source_b["model.layers.2.self_attn.q_proj.weight"])
