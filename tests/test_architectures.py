"""Architectures merge without a per-architecture table: tiny Mistral, Qwen2, Qwen3, Gemma,
Phi-3 (fused qkv/gate_up), Mixtral and Qwen2-MoE (expert tensors) built with transformers,
merged with linear and ties, and loaded back; tied embeddings; a base that `models` omits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from _support import TINY, load_dir
from fastmerge import run
from fastmerge.demo import fine_tune_of, make_state, write_checkpoint
from fastmerge.errors import ConfigError

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "mistral": lambda: transformers.MistralConfig(**COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=8, **COMMON),
    "gemma": lambda: transformers.GemmaConfig(head_dim=8, **COMMON),
    "phi3": lambda: transformers.Phi3Config(**COMMON),
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **COMMON),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                     shared_expert_intermediate_size=16, **COMMON),
}


def _save_family(root: Path, arch: str) -> list[Path]:
    """A random base and two perturbed copies of it (stand-ins for fine-tunes), fp32 safetensors."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    paths = []
    for i in range(3):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        paths.append(root / f"{arch}-{i}")
        model.save_pretrained(paths[-1])
    return paths


def _load(path: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert torch.isfinite(logits).all()
    return model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_architecture_merges_and_loads(tmp_path, arch):
    base, a, b = _save_family(tmp_path, arch)
    linear = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}
    out = run(linear, tmp_path / "linear", quiet=True).output_dir
    merged, left, right = load_dir(out), load_dir(a), load_dir(b)
    assert set(merged) == set(left)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (left[name] + right[name]) / 2)
    _load(out)

    ties = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5, "weight": 0.5},
            "models": [{"model": str(a)}, {"model": str(b)}]}
    out = run(ties, tmp_path / "ties", quiet=True).output_dir
    assert set(load_dir(out)) == set(left)
    _load(out)


def _llama(root: Path, name: str, seed: int, tied: bool) -> Path:
    shape = replace(TINY, tie_word_embeddings=tied)
    state = fine_tune_of(make_state(replace(TINY, tie_word_embeddings=False), 0), seed)
    if tied:
        del state["lm_head.weight"]
    return write_checkpoint(root / name, state, shape, dtype=torch.float32)


def test_tied_base_with_untied_model_gets_a_merged_lm_head(tmp_path):
    """mergekit's rule: the output has lm_head when any input has it; a tied input gives its
    input embedding. The output config is untied so transformers uses that lm_head."""
    tied, untied = _llama(tmp_path, "tied", 1, True), _llama(tmp_path, "untied", 2, False)
    config = {"merge_method": "linear", "models": [{"model": str(tied), "parameters": {"weight": 0.5}}, {"model": str(untied), "parameters": {"weight": 0.5}}]}
    out = run(config, tmp_path / "out", quiet=True).output_dir
    merged, t, u = load_dir(out), load_dir(tied), load_dir(untied)
    torch.testing.assert_close(merged["lm_head.weight"], (t["model.embed_tokens.weight"] + u["lm_head.weight"]) / 2)
    torch.testing.assert_close(merged["model.embed_tokens.weight"], (t["model.embed_tokens.weight"] + u["model.embed_tokens.weight"]) / 2)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = _load(out)
    torch.testing.assert_close(model.lm_head.weight.detach(), merged["lm_head.weight"])


def test_untied_base_with_tied_model(tmp_path):
    tied, untied = _llama(tmp_path, "tied", 1, True), _llama(tmp_path, "untied", 2, False)
    config = {"merge_method": "task_arithmetic", "base_model": str(untied), "models": [{"model": str(tied), "parameters": {"weight": 1.0}}]}
    merged, t = load_dir(run(config, tmp_path / "out", quiet=True).output_dir), load_dir(tied)
    torch.testing.assert_close(merged["lm_head.weight"], t["model.embed_tokens.weight"])


def test_both_tied_stays_tied(tmp_path):
    a, b = _llama(tmp_path, "a", 1, True), _llama(tmp_path, "b", 2, True)
    config = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}]}
    out = run(config, tmp_path / "out", quiet=True).output_dir
    assert "lm_head.weight" not in load_dir(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    _load(out)


def test_linear_merges_a_base_that_models_does_not_list(tiny_models, tmp_path):
    """mergekit adds the unlisted base as one more input for base-ignoring methods; it takes
    parameters from the top level only."""
    config = {"merge_method": "linear", "base_model": str(tiny_models["base"]), "parameters": {"weight": 1.0},
              "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 2.0}}], "dtype": "float32"}
    merged = load_dir(run(config, tmp_path / "out", quiet=True).output_dir)
    base, ft = load_dir(tiny_models["base"]), load_dir(tiny_models["ft1"])
    for name in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(merged[name], (2 * ft[name].float() + base[name].float()) / 3)


def test_unlisted_base_without_a_weight_is_refused(tiny_models, tmp_path):
    config = {"merge_method": "linear", "base_model": str(tiny_models["base"]),
              "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match=r"weight.*base"):
        run(config, tmp_path / "out", quiet=True)
