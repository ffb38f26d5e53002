"""Parity with mergekit 0.1.5 (`mergekit-yaml`, dtype float32) on tiny sharded checkpoints.

Runs only where mergekit is installed: set FASTMERGE_MERGEKIT_YAML to its `mergekit-yaml`
(e.g. a separate venv: `python -m venv --system-site-packages /opt/mkvenv &&
/opt/mkvenv/bin/pip install mergekit==0.1.5`), or have `mergekit-yaml` on PATH.
The bound is issue 4's: max |difference| <= 1e-6 x the tensor's largest |value|.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from _support import assert_matches_mergekit, load_dir, mergekit_script, write_config
from fastmerge import run
from fastmerge.demo import LlamaShape, fine_tune_of, make_state, write_checkpoint

MERGEKIT_YAML = mergekit_script("mergekit-yaml")
pytestmark = pytest.mark.skipif(MERGEKIT_YAML is None, reason="mergekit-yaml not installed")

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
GRADIENT_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]


def configs(b, f1, f2, f3):
    weighted = [{"model": m, "parameters": {"weight": w}} for m, w in ((f1, 0.5), (f2, 1.0), (f3, 2.0))]
    three = [{"model": m} for m in (f1, f2, f3)]
    return {
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": f1}], "parameters": {"t": GRADIENT_T}},
        "nuslerp": {"merge_method": "nuslerp", "models": weighted[:2]},
        "nuslerp_rows_base": {"merge_method": "nuslerp", "base_model": b, "models": weighted[:2], "parameters": {"nuslerp_flatten": False}},
        "nuslerp_row_wise": {"merge_method": "nuslerp", "models": weighted[:2], "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "multislerp": {"merge_method": "multislerp", "models": weighted},
        "multislerp_base": {"merge_method": "multislerp", "base_model": b, "models": weighted},
        "karcher": {"merge_method": "karcher", "models": three},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": three},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": b, "models": three, "parameters": {"filter_wise": True}},
        "nearswap": {"merge_method": "nearswap", "base_model": b, "models": [{"model": b}, {"model": f1}], "parameters": {"t": [0.001, 0.01]}},
        "passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": f1, "layer_range": [0, 3]}]},
            {"sources": [{"model": f2, "layer_range": [1, 4], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
        ]},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": b, "models": [{"model": b}, {"model": f1}]},
        "ram": {"merge_method": "ram", "base_model": b, "models": three},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": b, "models": three, "parameters": {"r": 0.5, "alpha": 0.3}},
        # the tokenizer: block: a new token from another token's row, forced rows, padding
        "tokenizer_block": {"merge_method": "task_arithmetic", "base_model": b, "models": weighted, "tokenizer": {
            "source": "union", "pad_to_multiple_of": 16, "tokens": {
                "<new>": {"source": {"kind": "model_token", "model": f2, "token": "A"}},
                "B": {"source": f1, "force": True},
                "C": {"source": {"kind": "zero"}, "force": True},
                "D": {"source": {"kind": "model_token", "model": b, "token_id": 7}, "force": True}}}},
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    base = make_state(SHAPE, 0)
    paths = [write_checkpoint(root / "base", base, SHAPE, dtype=torch.float32, max_shard_bytes=60_000)]
    for i in (1, 2, 3):
        tuned = fine_tune_of(base, i, scale=0.3)
        if i == 3:  # a sparse fine-tune, so ram sees both unique and shared changes
            g = torch.Generator().manual_seed(9)
            tuned = {k: torch.where(torch.rand(v.shape, generator=g) < 0.5, v, base[k]) for k, v in tuned.items()}
        paths.append(write_checkpoint(root / f"ft{i}", tuned, SHAPE, dtype=torch.float32, max_shard_bytes=60_000))
    return root, [str(p) for p in paths]


@pytest.mark.parametrize("case", list(configs("b", "1", "2", "3")))
def test_matches_mergekit(case, checkpoints):
    root, paths = checkpoints
    config = write_config(root / f"{case}.yml", dict(configs(*paths)[case], dtype="float32"))
    subprocess.run([MERGEKIT_YAML, str(config), str(root / f"mk_{case}"), "--no-write-model-card", "--allow-crimes"], check=True, capture_output=True)
    ours = load_dir(run(config, root / f"fm_{case}", quiet=True).output_dir)
    theirs = load_dir(root / f"mk_{case}")
    assert_matches_mergekit(ours, theirs)


def test_unsafe_truncated_embeddings_match_mergekit(checkpoints):
    """--unsafe-truncate-embeddings: a model with 8 more vocabulary rows merges on the rows both
    have. (fastmerge also sets config.json's vocab_size to them; mergekit leaves it.)"""
    root, paths = checkpoints
    grown_state = {k: torch.cat([v, torch.randn(8, *v.shape[1:], generator=torch.Generator().manual_seed(5))])
                   if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in load_dir(Path(paths[1])).items()}
    grown = write_checkpoint(root / "grown", grown_state, replace(SHAPE, vocab_size=SHAPE.vocab_size + 8), dtype=torch.float32)
    config = write_config(root / "truncate.yml", {"merge_method": "task_arithmetic", "base_model": paths[0], "dtype": "float32",
                                                  "models": [{"model": str(grown), "parameters": {"weight": 0.7}},
                                                             {"model": paths[2], "parameters": {"weight": 0.5}}]})
    subprocess.run([MERGEKIT_YAML, str(config), str(root / "mk_truncate"), "--no-write-model-card", "--unsafe-truncate-embeddings"],
                   check=True, capture_output=True)
    ours = load_dir(run(config, root / "fm_truncate", quiet=True, truncate_embeddings=True).output_dir)
    theirs = load_dir(root / "mk_truncate")
    assert sorted(ours) == sorted(theirs) and ours["lm_head.weight"].shape[0] == SHAPE.vocab_size
    for name, expected in theirs.items():
        assert (ours[name].double() - expected.double()).abs().max().item() <= 1e-6 * expected.abs().max().item(), name


def test_a_lora_reference_matches_mergekit(checkpoints):
    """mergekit merges the adapter into a cached copy of the model with peft; fastmerge applies
    it as it reads. Same bound as the methods."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    root, paths = checkpoints
    adapter = root / "adapter"
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM.from_pretrained(paths[1], dtype=torch.float32)
    settings = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(model, settings).save_pretrained(str(adapter))
    def linear(first: str) -> dict:
        return {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": first, "parameters": {"weight": 0.6}}, {"model": paths[2], "parameters": {"weight": 0.4}}]}

    config = write_config(root / "lora.yml", linear(f"{paths[1]}+{adapter}"))
    subprocess.run([MERGEKIT_YAML, str(config), str(root / "mk_lora"), "--no-write-model-card", "--lora-merge-cache",
                    str(root / "lora_cache")], check=True, capture_output=True)
    ours = load_dir(run(config, root / "fm_lora", quiet=True).output_dir)
    theirs = load_dir(root / "mk_lora")
    plain = load_dir(run(linear(paths[1]), root / "fm_plain", quiet=True).output_dir)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"])
    assert_matches_mergekit(ours, theirs)


def test_a_multi_merge_file_matches_mergekit_multi(checkpoints):
    """Two merges, the second reading the first by name, through mergekit-multi and fastmerge."""
    from fastmerge.multi import run_multi

    mergekit_multi = os.path.join(os.path.dirname(MERGEKIT_YAML), "mergekit-multi")
    if not os.path.exists(mergekit_multi):
        pytest.skip("mergekit-multi not installed beside mergekit-yaml")
    root, paths = checkpoints
    soup = {"name": "soup", "merge_method": "ties", "base_model": paths[0], "dtype": "float32", "parameters": {"density": 0.6},
            "models": [{"model": paths[1], "parameters": {"weight": 0.5}}, {"model": paths[2], "parameters": {"weight": 0.5}}]}
    final = {"merge_method": "slerp", "base_model": paths[0], "dtype": "float32", "parameters": {"t": 0.3},
             "models": [{"model": paths[0]}, {"model": "soup"}]}
    config = root / "multi.yml"
    config.write_text(yaml.safe_dump_all([final, soup], sort_keys=False))
    subprocess.run([mergekit_multi, str(config), "-I", str(root / "mk_multi"), "--out-path", str(root / "mk_multi_final")],
                   check=True, capture_output=True)
    run_multi(config, root / "fm_multi", root / "fm_multi_final", quiet=True)
    for ours_dir, theirs_dir in ((root / "fm_multi" / "soup", root / "mk_multi" / "soup"), (root / "fm_multi_final", root / "mk_multi_final")):
        ours, theirs = load_dir(ours_dir), load_dir(theirs_dir)
        assert_matches_mergekit(ours, theirs)


def test_an_extracted_lora_matches_mergekit_extract_lora(checkpoints):
    """The same modules factored or saved whole, and every B @ A (signs of singular vectors
    are arbitrary, so products are compared) within the methods' bound."""
    from safetensors.torch import load_file

    from fastmerge.extraction import extract_lora

    extract = os.path.join(os.path.dirname(MERGEKIT_YAML), "mergekit-extract-lora")
    if not os.path.exists(extract):
        pytest.skip("mergekit-extract-lora not installed beside mergekit-yaml")
    root, paths = checkpoints
    subprocess.run([extract, "--model", paths[1], "--base-model", paths[0], "--out-path", str(root / "mk_extract"),
                    "--max-rank", "8", "--no-write-model-card"], check=True, capture_output=True)
    extract_lora(paths[1], paths[0], root / "fm_extract", max_rank=8)
    ours = load_file(str(root / "fm_extract" / "adapter_model.safetensors"))
    theirs = load_file(str(root / "mk_extract" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        if ".lora_B." in name:
            continue
        got = ours[name]
        if ".lora_A." in name:
            b = name.replace(".lora_A.", ".lora_B.")
            expected, got = theirs[b] @ expected, ours[b] @ got
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item(), name
