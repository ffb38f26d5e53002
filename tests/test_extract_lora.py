"""LoRA extraction: the factors against an SVD written out here, round trips through LoRA
references and peft, the module rules (saved whole, regexes, biases), and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _support import TINY
from fastmerge.cli import main
from fastmerge.demo import make_state, write_checkpoint
from fastmerge.errors import ConfigError, OutputError, PlanError
from fastmerge.extraction import extract_lora, low_rank_factors
from fastmerge.io.lora import open_model

P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def low_rank(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    return rand(rows, rank, seed=seed) @ rand(rank, cols, seed=seed + 1) * 0.01


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    """fp32 base and a fine-tune whose matrices moved by rank-3 deltas (norms moved too)."""
    base = make_state(TINY, seed=0)
    tuned = {name: t + (low_rank(*t.shape, 3, seed=i) if t.dim() == 2 else 0.01) for i, (name, t) in enumerate(base.items())}
    return (write_checkpoint(tmp_path / "base", base, TINY, dtype=torch.float32),
            write_checkpoint(tmp_path / "tuned", tuned, TINY, dtype=torch.float32))


def test_the_factors_are_the_truncated_svd(tmp_path):
    delta = rand(40, 30, seed=1) * torch.logspace(0, -3, 30)  # a decaying spectrum
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    best = (U[:, :5] * S[:5]) @ Vh[:5]
    A, B = low_rank_factors(delta, 5)
    assert A.shape == (5, 30) and B.shape == (40, 5)
    assert torch.allclose((B @ A).double(), best, atol=1e-5)
    assert torch.allclose((A @ A.T).double(), torch.diag(S[:5]), atol=1e-4)  # sqrt(S) on each side
    assert torch.allclose((B.T @ B).double(), torch.diag(S[:5]), atol=1e-4)
    A, B = low_rank_factors(delta, 5, distribute_scale=False)
    assert torch.allclose((B.T @ B).double(), torch.eye(5, dtype=torch.float64), atol=1e-5)
    assert torch.allclose((B @ A).double(), best, atol=1e-5)
    assert low_rank_factors(delta, 50)[0].shape[0] == 30
    assert low_rank_factors(delta, 50, sv_epsilon=float(S[8] + S[9]) / 2)[0].shape[0] == 9
    assert low_rank_factors(torch.zeros(6, 4), 3)[0].shape == (0, 4)


def test_randomized_svd_is_close_to_exact_and_seeded():
    delta = rand(300, 200, seed=2) * torch.logspace(0, -4, 200)
    exact_A, exact_B = low_rank_factors(delta, 16)
    A, B = low_rank_factors(delta, 16, svd="randomized", seed=7)
    best_error = (delta - exact_B @ exact_A).norm()
    assert (delta - B @ A).norm() <= best_error * 1.001
    again = low_rank_factors(delta, 16, svd="randomized", seed=7)
    assert torch.equal(again[0], A) and torch.equal(again[1], B)


def test_a_round_trip_gives_the_fine_tune_back(pair, tmp_path):
    base, tuned = pair
    report = extract_lora(tuned, base, tmp_path / "adapter", max_rank=8, sv_epsilon=1e-4)
    assert set(report.ranks.values()) == {3}  # beyond 3, the deltas' rounding noise (fp32 of base + delta - base)
    assert len(report.ranks) == 7 * TINY.num_hidden_layers
    assert max(report.relative_errors.values()) < 1e-5
    rebuilt, original = open_model(f"{base}+{tmp_path / 'adapter'}"), open_model(str(tuned))
    for name in original.names:
        assert torch.allclose(rebuilt.tensor(name), original.tensor(name), atol=1e-6), name


def test_what_is_factored_and_what_is_saved_whole(pair, tmp_path):
    base, tuned = pair
    extract_lora(tuned, base, tmp_path / "a", max_rank=2)
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved[P + Q + ".lora_A.weight"].shape == (2, 32) and saved[P + Q + ".lora_B.weight"].shape == (32, 2)
    assert saved[P + "model.embed_tokens.weight"].shape == (96, 32) and P + "lm_head.weight" in saved
    assert P + "model.layers.1.input_layernorm.weight" in saved
    assert config["modules_to_save"] == ["embed_tokens", "input_layernorm", "lm_head", "norm", "post_attention_layernorm"]
    assert config["r"] == config["lora_alpha"] == 2 and config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    extract_lora(tuned, base, tmp_path / "b", max_rank=2, embed_lora=True, skip_undecomposable=True, exclude=[r"layers\.1\."])
    saved = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert saved[P + "model.embed_tokens.lora_embedding_A"].shape == (2, 96)
    assert saved[P + "model.embed_tokens.lora_embedding_B"].shape == (32, 2)
    assert saved[P + "lm_head.lora_A.weight"].shape == (2, 32)
    assert not [k for k in saved if "layernorm" in k or "layers.1." in k]

    extract_lora(tuned, base, tmp_path / "c", max_rank=2, include=["q_proj"], modules_to_save=["o_proj"])
    saved = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted([P + f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(3) for ab in "AB"]
                                   + [P + f"model.layers.{i}.self_attn.o_proj.weight" for i in range(3)])


def test_a_bias_delta_becomes_lora_b_bias(tmp_path):
    (tmp_path / "in").mkdir()
    w, b = rand(6, 5, seed=1), rand(6, seed=2)
    save_file({"fc.weight": w, "fc.bias": b}, str(tmp_path / "in" / "base.safetensors"))
    save_file({"fc.weight": w + low_rank(6, 5, 1, 3), "fc.bias": b + 0.5}, str(tmp_path / "in" / "tuned.safetensors"))
    extract_lora(tmp_path / "in" / "tuned.safetensors", tmp_path / "in" / "base.safetensors", tmp_path / "a", max_rank=4)
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert torch.allclose(saved[P + "fc.lora_B.bias"], torch.full((6,), 0.5))
    rebuilt = open_model(f"{tmp_path / 'in' / 'base.safetensors'}+{tmp_path / 'a'}")
    assert torch.allclose(rebuilt.tensor("fc.bias"), b + 0.5) and torch.allclose(rebuilt.tensor("fc.weight"), w + low_rank(6, 5, 1, 3), atol=1e-6)


def test_peft_applies_the_extracted_adapter_as_fastmerge_does(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(tmp_path / "base"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    model.save_pretrained(str(tmp_path / "tuned"))
    extract_lora(tmp_path / "tuned", tmp_path / "base", tmp_path / "adapter", max_rank=4, embed_lora=True)
    merged = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base")),
                                            str(tmp_path / "adapter")).merge_and_unload().state_dict()
    ours = open_model(f"{tmp_path / 'base'}+{tmp_path / 'adapter'}")
    assert sorted(ours.names) == sorted(merged)
    assert [n for n in ours.names if not torch.allclose(ours.tensor(n), merged[n], atol=1e-6)] == []


def test_bad_input(pair, tmp_path, capsys):
    base, tuned = pair
    with pytest.raises(ConfigError, match="--max-rank"):
        extract_lora(tuned, base, tmp_path / "a", max_rank=0)
    with pytest.raises(ConfigError, match="--include-regex"):
        extract_lora(tuned, base, tmp_path / "a", include=["("])
    with pytest.raises(ConfigError, match=r"--exclude-regex: give a list of regular expressions, e.g. \['q_proj'\]"):
        extract_lora(tuned, base, tmp_path / "a", exclude="q_proj")  # searched letter by letter before
    with pytest.raises(ConfigError, match="--svd"):
        extract_lora(tuned, base, tmp_path / "a", svd="fast")
    for bad in (True, -1e-3, float("nan"), "0.1"):
        with pytest.raises(ConfigError, match="--sv-epsilon"):
            extract_lora(tuned, base, tmp_path / "a", sv_epsilon=bad)
    with pytest.raises(ConfigError, match="seed"):
        extract_lora(tuned, base, tmp_path / "a", seed=1.5)
    with pytest.raises(ConfigError, match="embed_lora"):
        extract_lora(tuned, base, tmp_path / "a", embed_lora="yes")
    assert not (tmp_path / "a").exists()
    with pytest.raises(PlanError, match="nothing to extract"):
        extract_lora(tuned, base, tmp_path / "a", include=["nothing"])
    other = make_state(TINY, seed=0)
    other["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 31)
    odd = write_checkpoint(tmp_path / "odd", other, TINY, dtype=torch.float32)
    with pytest.raises(PlanError, match=r"model.layers.0.self_attn.q_proj.weight: shape \[32, 32\]"):
        extract_lora(tuned, odd, tmp_path / "a")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(OutputError, match="already exists"):
        extract_lora(tuned, base, tmp_path / "exists")
    assert not (tmp_path / "a").exists()
    code = main(["extract-lora", "--model", str(tuned), "--base-model", str(tmp_path / "nope"), "--out-path", str(tmp_path / "a")])
    assert code == 2 and "nope" in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_the_cli(pair, tmp_path, capsys):
    base, tuned = pair
    code = main(["extract-lora", "--model", str(tuned), "--base-model", str(base), "--out-path", str(tmp_path / "a"),
                 "--max-rank", "3", "--svd", "randomized", "--quiet", "-e", "mlp", "--save-module", "lm_head"])
    assert code == 0 and "extracted 12 LoRA updates (rank <= 3)" in capsys.readouterr().out


def test_the_mergekit_extract_lora_drop_in(pair, tmp_path, capsys):
    from fastmerge.cli import mergekit_extract_lora_main

    base, tuned = pair
    code = mergekit_extract_lora_main(["--model", str(tuned), "--base-model", str(base), "--out-path", str(tmp_path / "a"),
                                       "--max-rank", "3", "--no-write-model-card", "--lora-merge-cache", str(tmp_path / "c"),
                                       "-j", "1", "--random-seed", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0 and "extracted 21 LoRA updates" in out and "--lora-merge-cache accepted and ignored" in err
    assert "write-model-card" not in err  # --no-write-model-card asks for what fastmerge does anyway: no note
    assert not (tmp_path / "c").exists()
    if not torch.cuda.is_available():
        code = mergekit_extract_lora_main(["--model", str(tuned), "--base-model", str(base), "--out-path", str(tmp_path / "b"), "--cuda"])
        assert code == 2 and "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "b").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_extraction_on_a_gpu_agrees_with_the_cpu(pair, tmp_path):
    base, tuned = pair
    for svd in ("exact", "randomized"):
        cpu = extract_lora(tuned, base, tmp_path / f"cpu-{svd}", max_rank=4, svd=svd, device="cpu")
        gpu = extract_lora(tuned, base, tmp_path / f"gpu-{svd}", max_rank=4, svd=svd, device="cuda")
        assert cpu.ranks == gpu.ranks
        ours, theirs = (open_model(f"{base}+{tmp_path / name}") for name in (f"cpu-{svd}", f"gpu-{svd}"))
        assert all(torch.allclose(ours.tensor(n), theirs.tensor(n), atol=1e-5) for n in ours.names)


def test_the_top_level_names_stay_functions_after_their_modules_load():
    """`fastmerge.extract_lora` is the function even once fastmerge.extraction is imported."""
    import fastmerge
    import fastmerge.extraction
    import fastmerge.multi

    assert fastmerge.extract_lora is extract_lora and callable(fastmerge.run_multi)
