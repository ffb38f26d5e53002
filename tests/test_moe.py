"""`fastmerge moe` / `fastmerge-moe`: Mixtral MoEs built from dense toy Llamas, Qwen3 MoEs from
toy Qwen3s.

The expected tensors are re-derived here from the layout in fastmerge/moe/build.py's docstring
and the gate formulas in fastmerge/moe/gates.py's (token embeddings summed prompt by prompt, the
hidden states of unpadded prompts), and the built model is run with transformers: with every
expert a copy of the base MLP and every expert used, the MoE must compute what the base does.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _support import assert_matches_mergekit, load_dir, mergekit_script
from fastmerge.cli import main, mergekit_moe_main
from fastmerge.errors import CheckpointError, ConfigError
from fastmerge.moe import build_moe, load_moe_config

transformers = pytest.importorskip("transformers")
from fastmerge.representations.toy import save_char_tokenizer, save_toy_llama  # noqa: E402  (needs transformers)

PROMPTS = {"e1": (["math 12", "sums 3"], ["poems"]), "e2": (["a poem", "rhyme"], [])}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: save_toy_llama(root / name, seed=i, num_layers=3) for i, name in enumerate(("base", "e1", "e2"))}


@pytest.fixture(scope="module")
def qwen3_models(tmp_path_factory) -> dict[str, Path]:
    """Toy Qwen3s (q_norm and k_norm in every layer, which Qwen3 MoE keeps) with the char tokenizer."""
    root = tmp_path_factory.mktemp("qwen3")
    models = {}
    for i, name in enumerate(("base", "e1", "e2")):
        models[name] = root / name
        vocab = save_char_tokenizer(models[name])
        config = transformers.Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          tie_word_embeddings=False, bos_token_id=2, eos_token_id=3)
        torch.manual_seed(10 + i)
        transformers.Qwen3ForCausalLM(config).save_pretrained(str(models[name]))
    return models


def _config(models: dict[str, Path], gate_mode: str = "cheap_embed", **top) -> dict:
    experts = [{"source_model": str(models[name]), "positive_prompts": pos, **({"negative_prompts": neg} if neg else {})}
               for name, (pos, neg) in PROMPTS.items()]
    return {"base_model": str(models["base"]), "gate_mode": gate_mode, "experts": experts, **top}


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def test_layout_keeps_the_base_and_stacks_each_experts_mlp(models, tmp_path):
    build_moe(_config(models, dtype="bfloat16"), tmp_path / "out", quiet=True)
    out, base = load_dir(tmp_path / "out"), load_dir(models["base"])
    experts = [load_dir(models["e1"]), load_dir(models["e2"])]
    for name, tensor in base.items():
        if ".mlp." not in name:
            assert torch.equal(out[name], tensor.to(torch.bfloat16)), name
    for layer in range(3):
        mlp = f"model.layers.{layer}.mlp."
        for e, expert in enumerate(experts):
            gate_up = out[mlp + "experts.gate_up_proj"][e]
            assert torch.equal(gate_up[:64], expert[mlp + "gate_proj.weight"].to(torch.bfloat16))
            assert torch.equal(gate_up[64:], expert[mlp + "up_proj.weight"].to(torch.bfloat16))
            assert torch.equal(out[mlp + "experts.down_proj"][e], expert[mlp + "down_proj.weight"].to(torch.bfloat16))
        assert out[mlp + "gate.weight"].shape == (2, 32) and out[mlp + "gate.weight"].dtype == torch.bfloat16
    assert not any(".mlp.gate_proj" in name or ".mlp.up_proj" in name for name in out)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["sliding_window"]) == (2, 2, None)
    assert config["dtype"] == "bfloat16" and (tmp_path / "out" / "tokenizer.json").is_file()


def test_cheap_embed_routers_are_the_prompts_embedding_sums(models, tmp_path):
    build_moe(_config(models), tmp_path / "out", quiet=True)
    out = load_dir(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(models["base"]))
    embed = load_dir(models["base"])["model.embed_tokens.weight"].double()

    def embedding_sum(prompts):
        ids = [i for p in prompts for i in tokenizer(tokenizer.bos_token + p, add_special_tokens=False)["input_ids"]]
        return _unit(embed[ids].sum(dim=0))

    expected = [_unit(embedding_sum(pos) - (embedding_sum(neg) if neg else 0)) for pos, neg in PROMPTS.values()]
    for layer in range(3):
        torch.testing.assert_close(out[f"model.layers.{layer}.mlp.gate.weight"].double(), torch.stack(expected),
                                   rtol=0, atol=1e-6)


def test_hidden_routers_are_the_last_tokens_hidden_states(models, tmp_path):
    prompts = {"e1": (["abcd", "wxyz"], []), "e2": (["1234", "5678"], ["9999"])}  # one length: no padding
    config = _config(models, "hidden")
    for expert, (pos, neg) in zip(config["experts"], prompts.values()):
        expert["positive_prompts"], expert["negative_prompts"] = pos, neg
    build_moe(config, tmp_path / "out", quiet=True, device="cpu")
    out = load_dir(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(models["base"]))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(models["base"]), dtype=torch.float32)

    def last_hidden(texts):
        states = []
        for text in texts:
            ids = tokenizer(tokenizer.bos_token + text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                hidden = model(**ids, output_hidden_states=True).hidden_states[:-1]
            states.append(torch.stack([h[0, -1] for h in hidden]))
        return torch.stack(states).mean(dim=0)  # (layers, hidden)

    for e, (pos, neg) in enumerate(prompts.values()):
        expected = _unit(last_hidden(pos) - (last_hidden(neg) if neg else 0))
        for layer in range(3):
            got = out[f"model.layers.{layer}.mlp.gate.weight"][e].float()
            assert torch.nn.functional.cosine_similarity(got, expected[layer], dim=0) > 0.99, (e, layer)


def test_a_prompt_set_experts_share_runs_the_base_model_once(models, tmp_path, monkeypatch):
    from fastmerge.moe import gates

    runs = []
    real = gates.streamed_forward

    def counted(base, skeleton, device, **inputs):
        runs.append(inputs["input_ids"].shape[0])
        return real(base, skeleton, device, **inputs)

    monkeypatch.setattr(gates, "streamed_forward", counted)
    config = _config(models, "hidden")
    for expert in config["experts"]:
        expert["negative_prompts"] = ["poems", "odes"]
    build_moe(config, tmp_path / "out", quiet=True, device="cpu")
    assert sorted(runs) == [2, 2, 2]  # e1's positive prompts, e2's, and the negative ones once
    routers = load_dir(tmp_path / "out")["model.layers.1.mlp.gate.weight"].float()
    assert not torch.allclose(routers[0], routers[1])
    torch.testing.assert_close(routers.norm(dim=1), torch.ones(2), rtol=0, atol=1e-2)


def test_random_modes_are_seeded_and_scaled(models, tmp_path):
    def routers(mode, seed, name):
        build_moe(_config(models, mode), tmp_path / name, seed=seed, quiet=True)
        return torch.stack([load_dir(tmp_path / name)[f"model.layers.{i}.mlp.gate.weight"] for i in range(3)])

    first, again, other = routers("random", 1, "a"), routers("random", 1, "b"), routers("random", 2, "c")
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.dtype == torch.float32 and 0.7 < first.std().item() < 1.3
    uniform = routers("uniform_random", 1, "d")
    bound = math.sqrt(1 / 32)
    assert uniform.abs().max().item() <= bound and uniform.abs().max().item() > 0.8 * bound


def test_noise_and_residual_scale_change_only_their_expert(models, tmp_path):
    config = _config(models)
    config["experts"][0]["noise_scale"] = 0.01
    config["experts"][1]["residual_scale"] = 0.5
    build_moe(config, tmp_path / "out", quiet=True)
    out, e1, e2 = load_dir(tmp_path / "out"), load_dir(models["e1"]), load_dir(models["e2"])
    mlp = "model.layers.1.mlp."
    noise = out[mlp + "experts.gate_up_proj"][0][:64] - e1[mlp + "gate_proj.weight"]
    assert 0.008 < noise.std().item() < 0.012
    assert torch.equal(out[mlp + "experts.down_proj"][1], e2[mlp + "down_proj.weight"] * 0.5)
    assert torch.equal(out[mlp + "experts.gate_up_proj"][1][64:], e2[mlp + "up_proj.weight"])


def test_identical_experts_compute_what_the_base_computes(models, tmp_path):
    config = {"base_model": str(models["base"]), "gate_mode": "random", "experts_per_token": 4,
              "experts": [{"source_model": str(models["base"])}] * 4}
    with pytest.raises(ConfigError, match="same model"):
        build_moe(config, tmp_path / "refused", quiet=True)
    assert not (tmp_path / "refused").exists()
    build_moe(config, tmp_path / "out", quiet=True, allow_all_same=True)
    _assert_computes_like(tmp_path / "out", models["base"], "MixtralForCausalLM")


def _assert_computes_like(moe_dir: Path, dense_dir: Path, moe_class: str) -> None:
    """The MoE, loaded by transformers as `moe_class`, gives the dense model's logits."""
    moe = transformers.AutoModelForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32)
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32)
    assert type(moe).__name__ == moe_class
    ids = torch.tensor([[2, 7, 9, 11, 30, 4]])
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-5)


def test_qwen3_moe_from_qwen3_models(qwen3_models, tmp_path):
    config = _config(qwen3_models, "random")
    report = build_moe(config, tmp_path / "out", quiet=True)
    assert report.architecture == "Qwen3 MoE"
    out, base, e2 = load_dir(tmp_path / "out"), load_dir(qwen3_models["base"]), load_dir(qwen3_models["e2"])
    assert torch.equal(out["model.layers.1.self_attn.q_norm.weight"], base["model.layers.1.self_attn.q_norm.weight"])
    gate_up = out["model.layers.1.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (2, 96, 32) and torch.equal(gate_up[1][48:], e2["model.layers.1.mlp.up_proj.weight"])
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["model_type"], written["num_experts"], written["moe_intermediate_size"]) == ("qwen3_moe", 2, 48)
    with pytest.raises(ConfigError, match="not Mixtral: it is built from llama or mistral models"):
        build_moe({**config, "architecture": "mixtral"}, tmp_path / "refused", quiet=True)


def test_identical_qwen3_experts_compute_what_the_base_computes(qwen3_models, tmp_path):
    config = {"base_model": str(qwen3_models["base"]), "gate_mode": "uniform_random", "experts_per_token": 2,
              "experts": [{"source_model": str(qwen3_models["base"])}] * 2}
    build_moe(config, tmp_path / "out", quiet=True, allow_all_same=True)
    _assert_computes_like(tmp_path / "out", qwen3_models["base"], "Qwen3MoeForCausalLM")


def _with_config(models: dict[str, Path], **changes) -> dict:
    config = _config(models)
    config.update(changes)
    return config


@pytest.mark.parametrize("change, message", [
    ({"shared_experts": "x"}, "`shared_experts` must be a non-empty list"),
    ({"architecture": "qwen"}, "not Qwen MoE: it takes exactly one shared expert; not Qwen3 MoE: it is built from qwen3"),
    ({"architecture": "gpt"}, "names none of the outputs: Mixtral, DeepSeek MoE, Qwen MoE, Qwen3 MoE"),
    ({"gate_mode": "smart"}, "gate_mode: 'smart'"),
    ({"experts_per_token": 3}, "experts_per_token"),
    ({"dtpye": "bfloat16"}, "unknown key `config.dtpye`"),
    ({"dtype": "float64"}, "`dtype: 'float64'`"),
    ({"experts": []}, "`experts` must be a non-empty list"),
])
def test_bad_configs_are_named(models, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        build_moe(_with_config(models, **change), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value, message", [
    ("noise_scale", float("nan"), "must be a finite number >= 0.0, got nan"),  # wrote NaN into the experts
    ("noise_scale", -0.1, "must be a finite number >= 0.0, got -0.1"),
    ("residual_scale", float("inf"), "must be a finite number, got inf"),
])
def test_expert_scales_are_finite(models, key, value, message):
    config = _config(models)
    config["experts"][0][key] = value
    with pytest.raises(ConfigError, match=rf"experts\[0\]\.{key}` {message}"):
        load_moe_config(config)


def test_prompt_modes_need_different_prompts_for_every_expert(models):
    config = _config(models)
    config["experts"][1]["positive_prompts"] = []
    with pytest.raises(ConfigError, match=r"experts\[1\].positive_prompts` is empty"):
        load_moe_config(config)
    for expert in config["experts"]:
        expert["positive_prompts"], expert["negative_prompts"] = ["same"], []
    with pytest.raises(ConfigError, match="same positive and negative prompts"):
        load_moe_config(config)
    config["gate_mode"] = "uniform_random"  # prompts are not read: mergekit requires them anyway
    assert load_moe_config(config).gate_mode == "uniform_random"


def _copy_model(source: Path, target: Path, edit) -> Path:
    """A copy of a toy model with its tensors (and config) edited."""
    from safetensors.torch import save_file

    target.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((source / name).read_bytes())
    tensors = load_dir(source)
    edit(tensors, target)
    save_file(tensors, str(target / "model.safetensors"))
    return target


def test_bad_models_are_named_and_leave_no_output(models, tmp_path):
    def biased(tensors, _):
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)

    def narrower(tensors, _):
        tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(48, 32)

    def qwen(_, target):
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))

    cases = [("base_model", biased, "q_proj.bias' has no place in a Mixtral model"),
             ("experts", narrower, r"up_proj.weight has shape \[48, 32\], but the base model's is \[64, 32\]"),
             ("base_model", qwen, "model_type 'qwen2'")]
    for i, (slot, edit, message) in enumerate(cases):
        bad = _copy_model(models["base"] if slot == "base_model" else models["e2"], tmp_path / f"bad{i}", edit)
        config = _config(models)
        if slot == "base_model":
            config["base_model"] = str(bad)
        else:
            config["experts"][1]["source_model"] = str(bad)
        with pytest.raises((CheckpointError, ConfigError), match=message):
            build_moe(config, tmp_path / f"out{i}", quiet=True)
        assert not (tmp_path / f"out{i}").exists()
        assert not list(tmp_path.glob(f".out{i}.fastmerge-tmp-*"))


def test_cli_and_drop_in(models, tmp_path, capsys):
    config = _write(tmp_path, _config(models, "random", dtype="float16"))
    assert main(["moe", str(config), str(tmp_path / "a"), "--seed", "4", "--quiet"]) == 0
    assert mergekit_moe_main([str(config), str(tmp_path / "b"), "--random-seed", "4", "--quiet"]) == 0
    assert "built a Mixtral model of 2 experts" in capsys.readouterr().out
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float16 for k in a)
    assert mergekit_moe_main([str(config), str(tmp_path / "c"), "--load-in-8bit"]) == 2
    assert "--load-in-8bit are not supported" in capsys.readouterr().err
    assert main(["moe", str(config), str(tmp_path / "a")]) == 2, "the output exists"
    assert not (tmp_path / "c").exists()


SHARED = {"source_model": "e2", "noise_scale": 0.03, "residual_scale": 0.9}
SHARED_PROMPTED = {**SHARED, "positive_prompts": ["anything at all"]}
PARITY_CASES = [("llama", mode, None, None) for mode in ("cheap_embed", "hidden", "hidden_avg", "random", "uniform_random")] + [
    ("qwen3", "hidden", None, None), ("qwen3", "random", None, None),
    ("llama", "random", SHARED, None),  # DeepSeek MoE: a shared expert without prompts
    ("llama", "hidden", SHARED, None),
    ("llama", "cheap_embed", SHARED_PROMPTED, None),  # Qwen MoE: DeepSeek takes no prompts for it
    ("llama", "random", SHARED, "qwen"),
]


@pytest.mark.skipif(mergekit_script("mergekit-moe") is None, reason="mergekit-moe not installed")
@pytest.mark.parametrize("family, gate_mode, shared, architecture", PARITY_CASES)
def test_matches_mergekit_moe(request, tmp_path, family, gate_mode, shared, architecture):
    models = request.getfixturevalue("models" if family == "llama" else "qwen3_models")
    config = _config(models, gate_mode, dtype="bfloat16")
    config["experts"][0]["noise_scale"] = 0.02
    config["experts"][1]["residual_scale"] = 0.7
    if shared:
        config["shared_experts"] = [{**shared, "source_model": str(models[shared["source_model"]])}]
    if architecture:
        config["architecture"] = architecture
    path = _write(tmp_path, config)
    subprocess.run([mergekit_script("mergekit-moe"), str(path), str(tmp_path / "mk"), "--random-seed", "9",
                    "--no-write-model-card"], check=True, capture_output=True)
    assert mergekit_moe_main([str(path), str(tmp_path / "ours"), "--random-seed", "9", "--quiet"]) == 0
    assert_matches_mergekit(load_dir(tmp_path / "ours"), load_dir(tmp_path / "mk"))
    ours, theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "mk"))
    if ours["model_type"] == "deepseek":
        # mergekit dumps the whole base PretrainedConfig (transformers' generic defaults too);
        # DeepSeek's config class is remote code, so only what both files say can be compared.
        # mergekit keeps the base's `dtype` beside its new `torch_dtype`; fastmerge sets both.
        assert all(ours[k] == theirs[k] for k in ours.keys() & theirs.keys() - {"transformers_version", "dtype"})
        assert ours["dtype"] == ours["torch_dtype"] == theirs["torch_dtype"] == "bfloat16"
        assert ours.keys() >= {"n_routed_experts", "n_shared_experts", "auto_map", "moe_intermediate_size"}
    else:  # what transformers reads from each (its defaults fill what either leaves out)
        ours, theirs = ({k: v for k, v in transformers.AutoConfig.from_pretrained(str(tmp_path / d)).to_dict().items()
                         if k != "_name_or_path"} for d in ("ours", "mk"))
        assert ours == theirs


def test_qwen_moe_with_a_shared_expert_loads_and_runs(models, tmp_path):
    config = _config(models, "random", shared_experts=[{"source_model": str(models["e2"])}], architecture="qwen")
    report = build_moe(config, tmp_path / "out", quiet=True)
    assert report.architecture == "Qwen MoE"
    out, e1, e2 = load_dir(tmp_path / "out"), load_dir(models["e1"]), load_dir(models["e2"])
    assert torch.equal(out["model.layers.2.mlp.experts.0.down_proj.weight"], e1["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(out["model.layers.2.mlp.shared_expert.up_proj.weight"], e2["model.layers.2.mlp.up_proj.weight"])
    assert out["model.layers.2.mlp.gate.weight"].shape == (2, 32)
    assert out["model.layers.2.mlp.shared_expert_gate.weight"].shape == (1, 32)
    # Qwen2 attention has q/k/v biases, which a Llama lacks: zeros of the projections' widths.
    assert torch.equal(out["model.layers.0.self_attn.k_proj.bias"], torch.zeros(16))
    assert "model.layers.0.self_attn.o_proj.bias" not in out
    moe = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(moe(torch.tensor([[2, 7, 9, 11]])).logits).all()


def test_deepseek_moe_is_chosen_for_an_ungated_shared_expert(models, tmp_path):
    config = _config(models, "cheap_embed", shared_experts=[{"source_model": str(models["e1"])}])
    report = build_moe(config, tmp_path / "out", quiet=True)
    assert report.architecture == "DeepSeek MoE"
    out, e1 = load_dir(tmp_path / "out"), load_dir(models["e1"])
    assert torch.equal(out["model.layers.1.mlp.shared_experts.gate_proj.weight"], e1["model.layers.1.mlp.gate_proj.weight"])
    assert "model.layers.1.mlp.shared_expert_gate.weight" not in out
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["model_type"], written["n_routed_experts"], written["n_shared_experts"]) == ("deepseek", 2, 1)
    two = {**config, "shared_experts": config["shared_experts"] * 2}
    with pytest.raises(ConfigError, match="not DeepSeek MoE: it takes at most one shared expert"):
        build_moe(two, tmp_path / "refused", quiet=True)


def test_console_script_exits_2_naming_the_missing_model(models, tmp_path):
    config = _config(models)
    config["experts"][1]["source_model"] = str(tmp_path / "missing")
    path = _write(tmp_path, config)
    command = [sys.executable, "-c", "import sys; from fastmerge.console import fastmerge_moe; "
               "sys.argv[0] = 'fastmerge-moe'; fastmerge_moe()", str(path), str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "missing" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("shared", [False, True], ids=["fused Mixtral", "per-expert DeepSeek"])
def test_only_a_layer_of_inputs_stays_resident(tmp_path, monkeypatch, shared):
    """Each layer's input pages are released once it is assembled: a page touched after its
    release stays resident for good, and the build's memory would grow with the model."""
    import fastmerge.moe.build as build

    root = tmp_path / "wide"
    models = {n: save_toy_llama(root / n, seed=i, hidden_size=64, intermediate_size=2048, num_layers=32)
              for i, n in enumerate(("base", "e1", "e2"))}
    layer_bytes = 2 * 3 * 64 * 2048 * 4  # two experts' three fp32 projections
    samples = []

    def rss_file() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssFile:"))

    assemble = build._assemble

    def sampled(layout, layer, generator):
        parts = assemble(layout, layer, generator)
        samples.append(rss_file())
        return parts

    monkeypatch.setattr(build, "_assemble", sampled)
    config = _config(models, "random", **({"shared_experts": [{"source_model": str(models["e1"])}]} if shared else {}))
    build_moe(config, tmp_path / "out", quiet=True)
    assert len(samples) == 32
    # Sampled after each layer's assembly, whose own inputs are still mapped then.
    assert max(samples) - samples[0] < 4 * layer_bytes, "input pages of earlier layers stayed resident"


def test_an_expert_may_be_a_lora_reference(models, tmp_path):
    """`source_model: model+adapter` gives the adapted MLP (W + 2 B A with lora_alpha 8, r 4),
    applied as it is read, as in merges."""
    from _support import write_adapter

    down = "model.layers.1.mlp.down_proj"
    gen = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 64, generator=gen), torch.randn(32, 4, generator=gen)
    adapter = write_adapter(tmp_path / "adapter", {f"{down}.lora_A.weight": A, f"{down}.lora_B.weight": B})
    config = _config(models)
    config["experts"][1]["source_model"] = f"{models['e2']}+{adapter}"
    build_moe(config, tmp_path / "out", quiet=True)
    out, e2 = load_dir(tmp_path / "out"), load_dir(models["e2"])
    expected = (e2[f"{down}.weight"] + (B @ A) * 2.0).to(torch.float32)
    assert torch.equal(out["model.layers.1.mlp.experts.down_proj"][1], expected)
    assert torch.equal(out["model.layers.0.mlp.experts.down_proj"][1], e2["model.layers.0.mlp.down_proj.weight"])


def test_hidden_routers_of_a_lora_base_are_those_of_the_merged_base(models, tmp_path):
    """The hidden-state modes read the base through fastmerge's checkpoint reader, so a
    `model+adapter` base runs adapted: its routers are those of the adapter merged in first."""
    import shutil

    from safetensors.torch import load_file, save_file

    from _support import write_adapter

    q = "model.layers.0.self_attn.q_proj"
    gen = torch.Generator().manual_seed(4)
    A, B = torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen)
    adapter = write_adapter(tmp_path / "adapter", {f"{q}.lora_A.weight": A, f"{q}.lora_B.weight": B})
    merged = tmp_path / "merged"
    shutil.copytree(models["base"], merged)
    tensors = load_file(merged / "model.safetensors")
    tensors[f"{q}.weight"] = tensors[f"{q}.weight"] + (B @ A) * 2.0
    save_file(tensors, merged / "model.safetensors", metadata={"format": "pt"})

    routers = {}
    for name, base in (("adapted", f"{models['base']}+{adapter}"), ("merged", str(merged)), ("plain", str(models["base"]))):
        config = _config(models, "hidden")
        config["base_model"] = base
        build_moe(config, tmp_path / f"moe-{name}", quiet=True)
        routers[name] = load_dir(tmp_path / f"moe-{name}")["model.layers.1.mlp.gate.weight"]
    assert torch.equal(routers["adapted"], routers["merged"])
    assert not torch.equal(routers["adapted"], routers["plain"])
