"""LoRA references (`model+adapter`): the adapted tensors against the formulas written out here,
against peft's own merge_and_unload (byte for byte), inside config merges, and bad adapters
stopping the merge before anything is written."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _support import PREFIX, load_dir, write_adapter, write_config
from fastmerge import run
from fastmerge.cli import main
from fastmerge.config import load_config
from fastmerge.errors import CheckpointError, ConfigError, OutputError
from fastmerge.io import lora
from fastmerge.io.lora import AdaptedCheckpoint, apply_low_rank, open_model, split_reference
from fastmerge.methods import get_method
from fastmerge.plan import build_plan, open_checkpoints

Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"
EMBED = "model.embed_tokens"


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pair(module: str, out: int, inp: int, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    return {f"{module}.lora_A.weight": rand(rank, inp, seed=seed), f"{module}.lora_B.weight": rand(out, rank, seed=seed + 1) * 0.1}


def stored(model: Path, name: str) -> torch.Tensor:
    return load_dir(model)[name]


@pytest.fixture
def base(tiny_models) -> Path:
    return tiny_models["base"]


# -- the formulas ----------------------------------------------------------------------------


def test_a_linear_update_is_w_plus_scaled_ba_rounded_once(base, tmp_path):
    tensors = pair(Q, 32, 32) | pair(DOWN, 32, 72, seed=5)
    adapter = write_adapter(tmp_path / "a", tensors)
    adapted = open_model(f"{base}+{adapter}")
    for module in (Q, DOWN):
        w = stored(base, module + ".weight")
        A, B = tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"]
        expected = (w.float() + (B @ A) * 2.0).to(w.dtype)
        assert adapted.tensor(module + ".weight").dtype == w.dtype
        assert torch.equal(adapted.tensor(module + ".weight"), expected)
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(adapted.tensor(untouched), stored(base, untouched))
    assert adapted.names == open_model(str(base)).names


def test_rslora_and_the_rank_and_alpha_patterns(base, tmp_path):
    tensors = pair(Q, 32, 32, rank=2) | pair(DOWN, 32, 72, rank=4, seed=5)
    adapter = write_adapter(tmp_path / "a", tensors, use_rslora=True, r=4, lora_alpha=8,
                            rank_pattern={"q_proj": 2}, alpha_pattern={"layers.1.mlp.down_proj": 3})
    adapted = open_model(f"{base}+{adapter}")
    for module, scale in ((Q, 8 / math.sqrt(2)), (DOWN, 3 / math.sqrt(4))):
        w = stored(base, module + ".weight")
        A, B = tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"]
        assert torch.equal(adapted.tensor(module + ".weight"), (w.float() + (B @ A) * scale).to(w.dtype))


def test_an_embedding_update_is_transposed_and_rounded_like_peft(base, tmp_path):
    """peft rounds an embedding's product to the table's dtype before adding it."""
    A, B = rand(4, 96, seed=1), rand(32, 4, seed=2)
    adapter = write_adapter(tmp_path / "a", {f"{EMBED}.lora_embedding_A": A, f"{EMBED}.lora_embedding_B": B})
    w = stored(base, EMBED + ".weight")
    expected = (w.float() + ((B @ A).T * 2.0).to(w.dtype).float()).to(w.dtype)
    assert torch.equal(open_model(f"{base}+{adapter}").tensor(EMBED + ".weight"), expected)


def test_dora_rescales_each_output_row_to_the_magnitude(base, tmp_path):
    tensors = pair(Q, 32, 32)
    magnitude = rand(32, seed=9).abs() + 0.5
    adapter = write_adapter(tmp_path / "a", tensors | {f"{Q}.lora_magnitude_vector": magnitude}, use_dora=True)
    w = stored(base, Q + ".weight").float()
    merged = w + (tensors[f"{Q}.lora_B.weight"] @ tensors[f"{Q}.lora_A.weight"]) * 2.0
    norms = merged.pow(2).sum(dim=1).sqrt()
    expected = (merged * (magnitude / norms)[:, None]).to(torch.bfloat16)
    got = open_model(f"{base}+{adapter}").tensor(Q + ".weight")
    assert (got.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-8
    assert torch.allclose(got.float().pow(2).sum(dim=1).sqrt(), magnitude, rtol=2e-2)


def test_a_half_dora_adapter_is_refused(base, tmp_path):
    """use_dora without a module's magnitude, or a magnitude without use_dora: peft would apply
    something else than the adapter says (the base weight's norms as the magnitude; plain LoRA)."""
    tensors = pair(Q, 32, 32)
    with pytest.raises(CheckpointError, match=f"module '{Q}': the adapter config sets use_dora but the module has no"):
        open_model(f"{base}+{write_adapter(tmp_path / 'a', tensors, use_dora=True)}")
    magnitude = {f"{Q}.lora_magnitude_vector": rand(32, seed=9).abs() + 0.5}
    with pytest.raises(CheckpointError, match="has a lora_magnitude_vector but the adapter config does not set use_dora"):
        open_model(f"{base}+{write_adapter(tmp_path / 'b', tensors | magnitude)}")


def test_dora_on_a_transposed_layer_rescales_each_stored_column(tmp_path):
    """fan_in_fan_out (in x out) and embeddings (vocab x width): the magnitude has one entry per
    output, a stored column, normed over every stored row."""
    w, embed = rand(12, 20, seed=1).half(), rand(30, 8, seed=6).half()
    save_file({"h.0.c_attn.weight": w, "wte.weight": embed}, str(tmp_path / "model.safetensors"))
    A, B, m = rand(3, 12, seed=3), rand(20, 3, seed=4), rand(20, seed=5).abs() + 0.5
    EA, EB, em = rand(3, 30, seed=7), rand(8, 3, seed=8), rand(8, seed=9).abs() + 0.5
    adapter = write_adapter(tmp_path / "a", {"h.0.c_attn.lora_A.weight": A, "h.0.c_attn.lora_B.weight": B,
                                             "h.0.c_attn.lora_magnitude_vector": m, "wte.lora_embedding_A": EA,
                                             "wte.lora_embedding_B": EB, "wte.lora_magnitude_vector": em},
                            r=3, lora_alpha=6, fan_in_fan_out=True, use_dora=True)
    adapted = open_model(f"{tmp_path / 'model.safetensors'}+{adapter}")
    for name, weight, product, magnitude in (("h.0.c_attn.weight", w, (B @ A).T, m), ("wte.weight", embed, (EB @ EA).T, em)):
        merged = weight.float() + product * 2.0
        expected = (merged * (magnitude / merged.pow(2).sum(dim=0).sqrt())[None, :]).half()
        got = adapted.tensor(name)
        assert (got.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-10, name


def test_fan_in_fan_out_and_lora_bias(tmp_path):
    """A GPT-2 style (in x out) weight takes the transposed product; lora_bias adds s * B's bias."""
    w, bias = rand(12, 20, seed=1).half(), rand(20, seed=2).half()
    save_file({"h.0.c_attn.weight": w, "h.0.c_attn.bias": bias}, str(tmp_path / "model.safetensors"))
    A, B, b_bias = rand(3, 12, seed=3), rand(20, 3, seed=4), rand(20, seed=5)
    adapter = write_adapter(tmp_path / "a", {"h.0.c_attn.lora_A.weight": A, "h.0.c_attn.lora_B.weight": B,
                                             "h.0.c_attn.lora_B.bias": b_bias}, r=3, lora_alpha=6, fan_in_fan_out=True)
    adapted = open_model(f"{tmp_path / 'model.safetensors'}+{adapter}")
    assert torch.equal(adapted.tensor("h.0.c_attn.weight"), (w.float() + (B @ A).T * 2.0).half())
    assert torch.equal(adapted.tensor("h.0.c_attn.bias"), (bias.float() + b_bias * 2.0).half())
    # what a plan counts as read: fp16 model tensors, fp32 adapter tensors
    assert adapted.read_bytes("h.0.c_attn.weight") == 2 * 12 * 20 + 4 * (3 * 12 + 20 * 3)
    assert adapted.read_bytes("h.0.c_attn.bias") == 2 * 20 + 4 * 20


def test_a_convolution_update_adds_the_scaled_kernel_product(tmp_path):
    """A conv LoRA: A convolves the layer's kernel into r channels, B maps them back 1 x 1, so
    the update of W[o, i, ...] is s * sum_r B[o, r] A[r, i, ...] (a 3 x 3 kernel, a 1 x 1 one and
    a 1-d one here). Small integers and s = 2, so every value is exact in each dtype. DoRA
    rescales each output channel over all its inputs and taps; a magnitude of another size and
    a B wider than 1 x 1 are refused."""
    gen = torch.Generator().manual_seed(3)
    ints = lambda *shape: torch.randint(-3, 4, shape, generator=gen).float()  # noqa: E731
    model = {"stem.conv.weight": ints(6, 3, 3, 3), "head.conv.weight": ints(5, 6, 1, 1), "seq.conv.weight": ints(4, 6, 5),
             "head.norm.weight": ints(5)}
    (tmp_path / "m").mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in model.items()}, str(tmp_path / "m" / "model.safetensors"))
    tensors = {"stem.conv.lora_A.weight": ints(4, 3, 3, 3), "stem.conv.lora_B.weight": ints(6, 4, 1, 1),
               "head.conv.lora_A.weight": ints(4, 6, 1, 1), "head.conv.lora_B.weight": ints(5, 4, 1, 1),
               "seq.conv.lora_A.weight": ints(4, 6, 5), "seq.conv.lora_B.weight": ints(4, 4, 1)}
    adapted = open_model(f"{tmp_path / 'm'}+{write_adapter(tmp_path / 'a', tensors)}")
    for module in ("stem.conv", "head.conv", "seq.conv"):
        A, B = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        expected = model[f"{module}.weight"] + 2.0 * torch.einsum("or,ri...->oi...", B.flatten(1), A)
        assert torch.equal(adapted.tensor(f"{module}.weight"), expected.to(torch.bfloat16)), module
    assert torch.equal(adapted.tensor("head.norm.weight"), model["head.norm.weight"].to(torch.bfloat16))
    magnitude = ints(1, 6, 1, 1).abs() + 1
    magnitudes = {"stem.conv.lora_magnitude_vector": magnitude, "head.conv.lora_magnitude_vector": ints(1, 5, 1, 1).abs() + 1,
                  "seq.conv.lora_magnitude_vector": ints(1, 4, 1).abs() + 1}
    dora = open_model(f"{tmp_path / 'm'}+{write_adapter(tmp_path / 'dora', tensors | magnitudes, use_dora=True)}")
    combined = model["stem.conv.weight"].double() + 2.0 * torch.einsum("or,ri...->oi...", tensors["stem.conv.lora_B.weight"].flatten(1).double(),
                                                                      tensors["stem.conv.lora_A.weight"].double())
    expected = magnitude.reshape(6, 1, 1, 1).double() * combined / combined.flatten(1).norm(dim=1).reshape(6, 1, 1, 1)
    torch.testing.assert_close(dora.tensor("stem.conv.weight").double(), expected, rtol=2 ** -8, atol=0)
    wrong = tensors | magnitudes | {"stem.conv.lora_magnitude_vector": torch.ones(1, 5, 1, 1)}
    with pytest.raises(CheckpointError, match="the DoRA magnitude has shape"):
        open_model(f"{tmp_path / 'm'}+{write_adapter(tmp_path / 'wrong', wrong, use_dora=True)}")
    wide = tensors | {"head.conv.lora_B.weight": ints(5, 4, 3, 3)}
    with pytest.raises(CheckpointError, match="neither matrices nor a convolution's LoRA"):
        open_model(f"{tmp_path / 'm'}+{write_adapter(tmp_path / 'wide', wide)}")
    grouped = tensors | {"stem.conv.lora_A.weight": ints(4, 1, 3, 3)}  # an A over 1 of the 3 input channels
    with pytest.raises(CheckpointError, match=r"B @ A is 6 x 1 x 3 x 3, which does not fit 'stem.conv.weight'"):
        open_model(f"{tmp_path / 'm'}+{write_adapter(tmp_path / 'grouped', grouped)}")


def test_stored_tensors_replace_the_models(base, tmp_path):
    """modules_to_save and embeddings saved with their base layer come from the adapter."""
    head, table = rand(96, 32, seed=1), rand(96, 32, seed=2).bfloat16()
    A, B = rand(4, 96, seed=3), rand(32, 4, seed=4)
    adapter = write_adapter(tmp_path / "a", {"lm_head.weight": head, f"{EMBED}.base_layer.weight": table,
                                             f"{EMBED}.lora_embedding_A": A, f"{EMBED}.lora_embedding_B": B})
    adapted = open_model(f"{base}+{adapter}")
    assert torch.equal(adapted.tensor("lm_head.weight"), head.bfloat16())
    expected = (table.float() + ((B @ A).T * 2.0).bfloat16().float()).bfloat16()
    assert torch.equal(adapted.tensor(EMBED + ".weight"), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, cols, rank", [(0, 5, 2), (1, 1, 1), (7, 3, 5), (9, 13, 2)])
def test_apply_low_rank_over_dtypes_odd_sizes_and_blocks(dtype, rows, cols, rank, monkeypatch):
    """Within one rounding of the exact value, in blocks of 3 rows and transposed. (The fp32
    product itself may differ from torch's whole-matrix B @ A in the last bit: BLAS picks its
    summation order by shape.)"""
    monkeypatch.setattr(lora, "APPLY_ROWS", 3)
    w, A, B = rand(rows, cols, seed=1).to(dtype), rand(rank, cols, seed=2), rand(rows, rank, seed=3)
    exact = w.double() + (B.double() @ A.double()) * 0.75
    # fp32 arithmetic error: a few fp32 epsilons of the terms' sizes (B @ A may cancel).
    slack = (rank + 2) * torch.finfo(torch.float32).eps * (w.double().abs() + 0.75 * (B.double().abs() @ A.double().abs()))
    assert_one_rounding(apply_low_rank(w, A, B, 0.75), exact, slack)
    assert_one_rounding(apply_low_rank(w.T.contiguous(), A, B, 0.75, transposed=True), exact.T, slack.T)
    assert apply_low_rank(w, A, B, 0.75).dtype == dtype


def assert_one_rounding(got: torch.Tensor, exact: torch.Tensor, slack: torch.Tensor) -> None:
    """got is `exact` rounded once to got's dtype, give or take `slack` before the rounding."""
    assert got.shape == exact.shape
    half_ulp = 0.5 * torch.finfo(got.dtype).eps * exact.abs()
    assert ((got.double() - exact).abs() <= half_ulp + slack * (1 + torch.finfo(got.dtype).eps) + 1e-30).all()


def test_the_bytes_do_not_depend_on_the_thread_count():
    script = textwrap.dedent("""
        import hashlib, sys, torch
        from fastmerge.io.lora import apply_low_rank
        torch.set_num_threads(int(sys.argv[1]))
        g = torch.Generator().manual_seed(0)
        w = torch.randn(2500, 333, generator=g).bfloat16()
        print(hashlib.sha256(apply_low_rank(w, torch.randn(7, 333, generator=g), torch.randn(2500, 7, generator=g), 0.3)
                             .view(torch.int16).numpy().tobytes()).hexdigest())
    """)
    digests = {subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True, check=True).stdout
               for n in (1, 2, 3)}
    assert len(digests) == 1


# -- against peft ------------------------------------------------------------------------------


def peft_merged(model_dir: Path, adapter: Path, auto_class: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import peft
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(str(model_dir), dtype=dtype)
    return peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


def peft_adapter(directory: Path, model_dir: Path, auto_class: str, dtype: torch.dtype, **settings) -> Path:
    import peft
    import transformers

    torch.manual_seed(len(directory.name))
    model = getattr(transformers, auto_class).from_pretrained(str(model_dir), dtype=dtype)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **settings)
    peft.get_peft_model(model, config).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama") / "base"
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("settings", [
    dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}),
    dict(target_modules=["q_proj", "o_proj", "up_proj", "embed_tokens"], use_dora=True),
    dict(target_modules="all-linear", use_rslora=True, modules_to_save=["lm_head"]),
], ids=["patterns+embedding", "dora+embedding", "rslora+modules_to_save"])
def test_the_same_bytes_as_peft_merge_and_unload(llama, tmp_path, settings):
    pytest.importorskip("peft")
    adapter = peft_adapter(tmp_path / "adapter", llama, "LlamaForCausalLM", torch.bfloat16, **settings)
    expected = peft_merged(llama, adapter, "LlamaForCausalLM", torch.bfloat16)
    adapted = open_model(f"{llama}+{adapter}")
    assert adapted.updates
    assert sorted(adapted.names) == sorted(expected)
    assert [name for name in adapted.names if not torch.equal(adapted.tensor(name), expected[name])] == []


@pytest.mark.parametrize("settings", [
    dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True),
    dict(target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True, use_dora=True),
], ids=["lora_bias", "dora"])
def test_the_same_bytes_as_peft_on_gpt2_fan_in_fan_out(tmp_path, settings):
    """GPT-2 stores its linear layers in x out; DoRA there (and on its embedding) rescales
    stored columns, each normed over all rows."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    model_dir = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).to(torch.float16).save_pretrained(str(model_dir))
    adapter = peft_adapter(tmp_path / "adapter", model_dir, "GPT2LMHeadModel", torch.float16, **settings)
    expected = peft_merged(model_dir, adapter, "GPT2LMHeadModel", torch.float16)
    adapted = open_model(f"{model_dir}+{adapter}")
    kinds = {(u.up_bias is not None, u.magnitude is not None, u.embedding) for u in adapted.updates.values()}
    assert kinds == ({(True, False, False)} if "lora_bias" in settings else {(False, True, False), (False, True, True)})
    assert [name for name in adapted.names if not torch.equal(adapted.tensor(name), expected[name])] == []


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_bytes_as_peft_on_resnet_convolutions(tmp_path, dtype, dora):
    """A ResNet's convolutions (7 x 7, 3 x 3 and 1 x 1) with LoRA and with DoRA, as for
    `fastmerge pytorch`'s vision models: byte for byte what peft's merge_and_unload gives (in
    fp32 the DoRA norm's summation order shows in the last bit)."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="bottleneck")
    torch.manual_seed(2)
    model_dir = tmp_path / "resnet"
    transformers.ResNetModel(config).to(dtype).save_pretrained(str(model_dir))
    adapter = peft_adapter(tmp_path / "adapter", model_dir, "ResNetModel", dtype, target_modules=["convolution"], use_dora=dora)
    expected = peft_merged(model_dir, adapter, "ResNetModel", dtype)
    adapted = open_model(f"{model_dir}+{adapter}")
    kernels = {tuple(adapted.info(name).shape[2:]) for name in adapted.updates}
    assert all(u.conv and (u.magnitude is not None) == dora for u in adapted.updates.values())
    assert kernels == {(7, 7), (3, 3), (1, 1)}
    assert [name for name in adapted.names if not torch.equal(adapted.tensor(name), expected[name])] == []


# -- in merges -------------------------------------------------------------------------------


def write_adapted_copy(adapted: AdaptedCheckpoint, source: Path, directory: Path) -> Path:
    """The adapter merged into a plain checkpoint, as mergekit's cache would hold it."""
    directory.mkdir()
    save_file({name: adapted.tensor(name).contiguous() for name in adapted.names}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text((source / "config.json").read_text())
    return directory


@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_a_merge_with_lora_references_equals_one_of_the_adapted_checkpoints(tiny_models, tmp_path, method):
    base = tiny_models["base"]
    adapter = write_adapter(tmp_path / "a", pair(Q, 32, 32) | pair(DOWN, 32, 72, seed=5))
    reference = f"{tiny_models['ft1']}+{adapter}"
    copy = write_adapted_copy(open_model(reference), tiny_models["ft1"], tmp_path / "copy")

    def config(model: str) -> dict:
        if method == "slerp":
            return {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.3},
                    "models": [{"model": str(base)}, {"model": model}]}
        models = [{"model": model, "parameters": {"weight": 0.7}}, {"model": str(tiny_models["ft2"]), "parameters": {"weight": 0.3}}]
        if method == "linear":
            return {"merge_method": "linear", "models": models}
        return {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5}, "models": models}

    for name, model in (("with_lora", reference), ("with_copy", str(copy)), ("without", str(tiny_models["ft1"]))):
        run(config(model), tmp_path / name, quiet=True)
    ours, theirs = load_dir(tmp_path / "with_lora"), load_dir(tmp_path / "with_copy")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(ours[Q + ".weight"], load_dir(tmp_path / "without")[Q + ".weight"])


def test_inputs_are_untouched_and_the_output_may_not_go_inside_the_adapter(tiny_models, tmp_path):
    adapter = write_adapter(tmp_path / "a", pair(Q, 32, 32))
    config = {"merge_method": "linear", "models": [{"model": f"{tiny_models['ft1']}+{adapter}", "parameters": {"weight": 1.0}}]}
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for d in (adapter, tiny_models["ft1"]) for p in d.iterdir()}
    run(config, tmp_path / "out", quiet=True)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
    with pytest.raises(OutputError):
        run(config, adapter / "out", quiet=True)


def test_config_forms_of_a_lora_reference(tmp_path):
    short = load_config({"merge_method": "linear", "models": [{"model": "m+a"}]})
    long = load_config({"merge_method": "linear", "models": [{"model": {"model": "m", "lora": "a"}}]})
    assert short.models[0].model == long.models[0].model == "m+a"
    with pytest.raises(ConfigError, match=r"models\[0\]\.model.*one '\+'"):
        load_config({"merge_method": "linear", "models": [{"model": "m+a+b"}]})
    with pytest.raises(ConfigError, match="without"):
        load_config({"merge_method": "linear", "models": [{"model": {"model": "m+x", "lora": "a"}}]})


def test_the_long_form_mergekit_writes(tmp_path):
    """mergekit writes a path with a space into an output's mergekit_config.yml as
    {model: {path, revision}, lora: ..., override_architecture: ...}; a revision counts only for
    a Hub id (a local path is read as it is, as mergekit does)."""
    def reference(model):
        return load_config({"merge_method": "linear", "models": [{"model": model}]}).models[0].model

    local = tmp_path / "my model"
    local.mkdir()
    written = {"model": {"path": str(local), "revision": None}, "lora": {"path": "a b", "revision": None},
               "override_architecture": None}
    assert reference(written) == f"{local}+a b"
    assert reference({"model": {"path": str(local), "revision": "main"}}) == str(local)
    assert reference({"model": {"path": "org/name", "revision": "v1"}, "lora": None}) == "org/name@v1"
    assert reference({"model": {"path": "org/name"}, "override_architecture": "LlamaForCausalLM"}) == "org/name"
    with pytest.raises(ConfigError, match=r"models\[0\]\.model\.model`: `path` must be a path"):
        reference({"model": {"path": 3}})
    with pytest.raises(ConfigError, match=r"models\[0\]\.model\.lora` must be a path or"):
        reference({"model": "m", "lora": ["a"]})
    with pytest.raises(ConfigError, match=r"models\[0\]\.model` must be a model path"):
        reference({"model": "m", "adapter": "a"})
    plus = tmp_path / "c++model"
    plus.mkdir()
    assert split_reference(str(plus)) == (str(plus), None)
    assert split_reference(f"{tmp_path}/m+{tmp_path}/a") == (f"{tmp_path}/m", f"{tmp_path}/a")


# -- bad adapters ------------------------------------------------------------------------------


def test_mergekit_lora_flags_are_accepted(tiny_models, tmp_path, capsys):
    from fastmerge.cli import mergekit_yaml_main

    adapter = write_adapter(tmp_path / "a", pair(Q, 32, 32))
    config = write_config(tmp_path / "m.yml", {"merge_method": "linear", "models": [{"model": f"{tiny_models['ft1']}+{adapter}", "parameters": {"weight": 1.0}}]})
    code = mergekit_yaml_main([str(config), str(tmp_path / "out"), "--lora-merge-cache", str(tmp_path / "cache"), "--lora-merge-dtype", "bfloat16"])
    assert code == 0 and "--lora-merge-cache accepted and ignored" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


BAD_ADAPTERS = {
    "not LoRA": (lambda: pair(Q, 32, 32), {"peft_type": "IA3"}, "only LoRA adapters"),
    "a variant": (lambda: pair(Q, 32, 32), {"use_bdlora": {"x": 1}}, "`use_bdlora` is set"),
    "only A": (lambda: {f"{Q}.lora_A.weight": rand(4, 32, seed=0)}, {}, "only one of lora_A / lora_B"),
    "rank vs config": (lambda: pair(Q, 32, 32, rank=3), {}, "rank 3 where the adapter config gives 4"),
    "no such module": (lambda: pair("model.layers.9.self_attn.q_proj", 32, 32), {}, "model.layers.9.self_attn.q_proj.weight"),
    "wrong shape": (lambda: pair(Q, 32, 31), {}, "does not fit"),
    "resized table": (lambda: {"lm_head.weight": rand(97, 32, seed=0)}, {}, "resized vocabularies"),
    "bad r": (lambda: pair(Q, 32, 32), {"r": 0}, "`r` must be a positive integer"),
    "dora magnitude": (lambda: pair(Q, 32, 32) | {f"{Q}.lora_magnitude_vector": rand(31, seed=0)}, {"use_dora": True}, "DoRA magnitude has shape [31], expected [32]"),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS, ids=list(BAD_ADAPTERS))
def test_a_bad_adapter_stops_the_merge_before_any_output(tiny_models, tmp_path, capsys, case):
    make, config, message = BAD_ADAPTERS[case]
    adapter = write_adapter(tmp_path / "a", make(), **config)
    merge = write_config(tmp_path / "m.yml", {"merge_method": "linear", "models": [{"model": f"{tiny_models['ft1']}+{adapter}", "parameters": {"weight": 1.0}}]})
    code = main(["run", str(merge), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(adapter) in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_missing_and_pickled_adapters(tiny_models, tmp_path):
    with pytest.raises(CheckpointError, match="no such LoRA adapter"):
        open_model(f"{tiny_models['ft1']}+{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a PEFT adapter"):
        open_model(f"{tiny_models['ft1']}+{tmp_path / 'empty'}")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({PREFIX + k: v for k, v in pair(Q, 32, 32).items()}, pickled / "adapter_model.bin")
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_model(f"{tiny_models['ft1']}+{pickled}")
    assert open_model(f"{tiny_models['ft1']}+{pickled}", allow_pickle=True).updates
    unprefixed = tmp_path / "unprefixed"
    unprefixed.mkdir()
    save_file(pair(Q, 32, 32), str(unprefixed / "adapter_model.safetensors"))
    (unprefixed / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(CheckpointError, match="not named as PEFT names"):
        open_model(f"{tiny_models['ft1']}+{unprefixed}")


def test_the_plan_names_each_adapter_and_what_it_changes(tiny_models, tmp_path, capsys):
    adapter = write_adapter(tmp_path / "a", pair(Q, 32, 32) | pair(DOWN, 32, 72, seed=5) | {"lm_head.weight": rand(96, 32, seed=1)})
    config = write_config(tmp_path / "m.yml", {"merge_method": "linear", "models": [
        {"model": f"{tiny_models['ft1']}+{adapter}", "parameters": {"weight": 0.5}}, {"model": str(tiny_models["ft2"]), "parameters": {"weight": 0.5}}]})
    assert main(["plan", str(config)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("LoRA adapter:")]
    assert lines == [f"LoRA adapter:  {adapter} on {tiny_models['ft1']}: 2 tensors updated, 1 stored whole"]


def test_the_plan_counts_the_adapter_bytes_read(tiny_models, tmp_path):
    """Input bytes: the model's tensors, the adapter's stored copy in place of the model's, and
    every A and B an update reads (a bias update: test_fan_in_fan_out_and_lora_bias)."""
    whole = rand(96, 32, seed=1).half()  # a stored copy in another dtype than the model's
    tensors = pair(Q, 32, 32) | pair(DOWN, 32, 72, seed=5) | {"lm_head.weight": whole}
    adapter = write_adapter(tmp_path / "a", tensors)
    ft1 = tiny_models["ft1"]

    def input_bytes(model: str) -> int:
        spec = load_config({"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}}]})
        checkpoints = open_checkpoints(spec)
        try:
            return build_plan(spec, get_method("linear"), checkpoints).input_bytes
        finally:
            for checkpoint in checkpoints.values():
                checkpoint.close()

    plain = open_model(str(ft1))
    model_lm_head = plain.info("lm_head.weight").nbytes
    plain.close()
    adapter_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k != "lm_head.weight")
    expected = input_bytes(str(ft1)) - model_lm_head + whole.numel() * 2 + adapter_bytes
    assert input_bytes(f"{ft1}+{adapter}") == expected
