"""`fastmerge pytorch` / `fastmerge-pytorch`: mergekit-pytorch's merge of arbitrary checkpoints,
every tensor by name, with its rule for tensors that not every model has (an error, -u, -i).

The models are small non-LLM state dicts (a conv stem, blocks, a head, an integer buffer) whose
values are multiples of 1/4, and the weights powers of 2, so every expected value below is exact
in fp32 whatever the order of the additions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _support import assert_matches_mergekit, load_dir, mergekit_script, write_config
from fastmerge.cli import main, mergekit_pytorch_main

WEIGHTS = (0.5, 0.25, 0.25)


def _quarters(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-8, 9, shape, generator=gen).float() / 4


def _state(seed: int, blocks: int, extra: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {"stem.conv.weight": _quarters((8, 3, 3, 3), gen), "head.bias": _quarters((10,), gen),
             "stem.bn.num_batches_tracked": torch.tensor(100 + seed)}
    for i in range(blocks):
        state[f"blocks.{i}.attn.qkv.weight"] = _quarters((12, 4), gen)
    if extra:
        state["adapter.scale"] = _quarters((5,), gen)
    return state


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    """base and m0 with 2 blocks; m1 with 2 blocks; m2 with a third block and an extra tensor."""
    states = {"base": _state(0, 2), "m0": _state(1, 2), "m1": _state(2, 2), "m2": _state(3, 3, extra=True)}
    paths = {}
    for name, state in states.items():
        paths[name] = tmp_path / "in" / f"{name}.safetensors"
        paths[name].parent.mkdir(exist_ok=True)
        save_file(state, paths[name])
    return paths


def _config(tmp_path: Path, models: dict[str, Path], method: str = "linear", base: bool = False, **extra) -> Path:
    config = {"merge_method": method, "models": [{"model": str(models[m]), "parameters": {"weight": w}}
                                                 for m, w in zip(("m0", "m1", "m2"), WEIGHTS)], "dtype": "float32", **extra}
    if base:
        config["base_model"] = str(models["base"])
    return write_config(tmp_path / f"{method}.yml", config)


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_a_tensor_some_model_lacks_stops_the_merge_by_default(models, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["pytorch", str(_config(tmp_path, models)), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "adapter.scale is missing from" in err and str(models["m0"]) in err and str(models["m1"]) in err
    assert "--tensor-union" in err and "--tensor-intersection" in err
    assert not out.exists()
    assert main(["plan", "--flat", str(_config(tmp_path, models))]) == 2
    assert "adapter.scale is missing from" in capsys.readouterr().err


def test_tensor_union_merges_each_tensor_from_the_models_that_have_it(models, tmp_path):
    """linear (normalized): the common tensors are the weighted mean of all three; the third
    block and adapter.scale, which only m2 has, are m2's own (0.25 x / 0.25); the integer buffer
    is the first model's."""
    out = tmp_path / "out"
    assert main(["pytorch", "-u", str(_config(tmp_path, models)), str(out), "--quiet"]) == 0
    merged, m = load_dir(out), [_load(models[k]) for k in ("m0", "m1", "m2")]
    assert sorted(merged) == sorted(m[2])
    for name in m[0]:
        if m[0][name].is_floating_point():
            assert torch.equal(merged[name], sum(w * s[name] for w, s in zip(WEIGHTS, m)) / sum(WEIGHTS)), name
    assert torch.equal(merged["stem.bn.num_batches_tracked"], m[0]["stem.bn.num_batches_tracked"])
    assert torch.equal(merged["blocks.2.attn.qkv.weight"], m[2]["blocks.2.attn.qkv.weight"])
    assert torch.equal(merged["adapter.scale"], m[2]["adapter.scale"])
    assert not (out / "config.json").exists()


def test_tensor_union_adds_the_task_vectors_of_the_models_that_have_a_tensor(models, tmp_path, capsys):
    """task_arithmetic over a base: a tensor m1 lacks gets the task vectors of m0 and m2 only;
    a tensor the base lacks cannot be merged (as mergekit-pytorch: an error naming it)."""
    m0_lacks = dict(_load(models["m0"]))
    del m0_lacks["head.bias"]
    save_file(m0_lacks, models["m0"])
    m2_plain = {k: v for k, v in _load(models["m2"]).items() if k not in ("adapter.scale", "blocks.2.attn.qkv.weight")}
    save_file(m2_plain, models["m2"])
    out = tmp_path / "out"
    assert main(["pytorch", "-u", str(_config(tmp_path, models, "task_arithmetic", base=True)), str(out), "--quiet"]) == 0
    merged, base, m = load_dir(out), _load(models["base"]), [_load(models[k]) for k in ("m0", "m1", "m2")]
    assert torch.equal(merged["head.bias"], base["head.bias"] + sum(w * (s["head.bias"] - base["head.bias"])
                                                                    for w, s in zip(WEIGHTS[1:], m[1:])))
    name = "stem.conv.weight"
    assert torch.equal(merged[name], base[name] + sum(w * (s[name] - base[name]) for w, s in zip(WEIGHTS, m)))

    save_file(_state(3, 3, extra=True), models["m2"])
    assert main(["pytorch", "-u", str(_config(tmp_path, models, "task_arithmetic", base=True)), str(tmp_path / "o2"), "--quiet"]) == 2
    assert f"adapter.scale is missing from the base model {models['base']}" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_tensor_intersection_leaves_out_what_not_every_model_has(models, tmp_path, capsys):
    config = _config(tmp_path, models)
    assert main(["plan", "-i", str(config)]) == 0
    planned = capsys.readouterr().out
    assert "tensors:       5" in planned and "2 tensor(s) not in every model left out" in planned
    assert "adapter.scale" in planned and not (tmp_path / "out").exists()
    assert main(["pytorch", "--tensor-intersection", str(config), str(tmp_path / "out")]) == 0
    report = capsys.readouterr().out
    assert "left out (--tensor-intersection)" in report
    assert sorted(load_dir(tmp_path / "out")) == sorted(_load(models["m0"]))


def test_pickled_checkpoints_merge_like_safetensors_with_allow_pickle(models, tmp_path, capsys):
    pickled = {}
    for name in ("m0", "m1", "m2"):
        pickled[name] = tmp_path / "in" / f"{name}.{'pt' if name != 'm2' else 'pth'}"
        torch.save(_load(models[name]), pickled[name])
    config = _config(tmp_path, pickled)
    assert main(["pytorch", "-u", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["pytorch", "-u", str(config), str(tmp_path / "out"), "--quiet", "--allow-pickle"]) == 0
    assert main(["pytorch", "-u", str(_config(tmp_path, models)), str(tmp_path / "ref"), "--quiet"]) == 0
    produced, expected = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert sorted(produced) == sorted(expected) and all(torch.equal(produced[k], expected[k]) for k in expected)


def test_slices_and_a_lone_base_tensor_are_errors(models, tmp_path, capsys):
    sliced = write_config(tmp_path / "s.yml", {"merge_method": "linear", "slices": [
        {"sources": [{"model": str(models["m0"]), "layer_range": [0, 2]}]}]})
    assert main(["pytorch", str(sliced), str(tmp_path / "out")]) == 2
    assert "takes `models:`, not `slices:`" in capsys.readouterr().err
    # The base listed among the models brings its own tensor names, one of them only its own.
    save_file(_state(0, 2, extra=True), models["base"])
    config = write_config(tmp_path / "b.yml", {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                                               "models": [{"model": str(models["base"])},
                                                          {"model": str(models["m0"]), "parameters": {"weight": 0.5}}]})
    assert main(["pytorch", "-u", str(config), str(tmp_path / "out")]) == 2
    assert "adapter.scale: only the base model has it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_mergekit_pytorch_flag_is_accepted(models, tmp_path, capsys):
    """mergekit 0.1.5's whole flag list (`mergekit-pytorch --help`), so scripts written for it run."""
    config = str(_config(tmp_path, models))
    code = mergekit_pytorch_main([
        config, str(tmp_path / "out"), "-u", "--no-allow-crimes", "--no-unsafe-truncate-embeddings", "--no-trust-remote-code",
        "--transformers-cache", str(tmp_path / "cache"), "--lora-merge-cache", str(tmp_path / "lora"),
        "--lora-merge-dtype", "float32", "--random-seed", "1", "-v", "--no-quiet", "--no-cuda", "--device", "cpu",
        "--no-low-cpu-memory", "--no-lazy-unpickle", "--no-read-to-gpu", "--no-multi-gpu", "-j", "1", "--no-async-write",
        "--write-threads", "1", "--out-shard-size", "1B", "--copy-tokenizer", "--no-clone-tensors",
        "--no-write-model-card", "--safe-serialization",
    ])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--transformers-cache accepted and ignored" in err and not (tmp_path / "cache").exists()
    assert mergekit_pytorch_main([config, str(tmp_path / "o2"), "--tensor-intersection", "--quiet"]) == 0
    with pytest.raises(SystemExit) as both:
        mergekit_pytorch_main([config, str(tmp_path / "o3"), "-i", "-u"])
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


MERGEKIT_PYTORCH = mergekit_script("mergekit-pytorch")


@pytest.mark.skipif(MERGEKIT_PYTORCH is None, reason="mergekit-pytorch not installed")
@pytest.mark.parametrize("method, flag, params", [
    ("linear", "-u", {}), ("task_arithmetic", "-i", {}), ("ties", "-i", {"density": 0.5}),
    ("breadcrumbs_ties", "-i", {"density": 0.6, "gamma": 0.1}), ("slerp", "-i", {}),
])
def test_matches_mergekit_pytorch(models, tmp_path, method, flag, params):
    """The same config and flag through mergekit-pytorch 0.1.5: the same tensors, within 1e-6 of
    each tensor's largest value (the bound of the mergekit-yaml parity tests)."""
    gen = torch.Generator().manual_seed(11)
    for name in ("base", "m0", "m1", "m2"):  # values off the quarter grid, so the methods' arithmetic shows;
        # one integer buffer for all (mergekit refuses buffers that differ, fastmerge copies the first model's)
        save_file({k: v + torch.randn(v.shape, generator=gen) * 0.1 if v.is_floating_point() else torch.tensor(7)
                   for k, v in _load(models[name]).items()}, models[name])
    if method == "slerp":
        config = write_config(tmp_path / "slerp.yml", {"merge_method": "slerp", "base_model": str(models["m0"]), "dtype": "float32",
                                                      "models": [{"model": str(models["m0"])}, {"model": str(models["m2"])}],
                                                      "parameters": {"t": 0.3}})
    else:
        config = _config(tmp_path, models, method, base=method != "linear",
                         parameters={**params, **({"normalize": True} if method == "ties" else {})})
    subprocess.run([MERGEKIT_PYTORCH, str(config), str(tmp_path / "mk"), flag], check=True, capture_output=True)
    assert main(["pytorch", flag, str(config), str(tmp_path / "fm"), "--quiet"]) == 0
    assert_matches_mergekit(load_dir(tmp_path / "fm"), load_dir(tmp_path / "mk"))


def test_merge_state_dicts_follows_the_same_rule_for_missing_keys(models):
    """The Python API's merge_state_dicts: the same three rules as the command, per-model
    parameter lists narrowed to the state dicts that have a key."""
    import fastmerge
    from fastmerge.errors import ConfigError, PlanError

    states = [_load(models[k]) for k in ("m0", "m1", "m2")]
    with pytest.raises(PlanError, match=r"adapter.scale is missing from state dict\(s\) 0, 1"):
        fastmerge.merge_state_dicts("linear", states, weight=list(WEIGHTS))
    union = fastmerge.merge_state_dicts("linear", states, weight=list(WEIGHTS), missing="union")
    assert sorted(union) == sorted(states[2])
    assert torch.equal(union["adapter.scale"], states[2]["adapter.scale"])
    name = "stem.conv.weight"
    assert torch.equal(union[name], sum(w * s[name] for w, s in zip(WEIGHTS, states)) / sum(WEIGHTS))
    common = fastmerge.merge_state_dicts("linear", states, weight=list(WEIGHTS), missing="intersection")
    assert sorted(common) == sorted(states[0]) and torch.equal(common[name], union[name])
    base = _load(models["base"])
    with pytest.raises(PlanError, match="adapter.scale is missing from the base state dict"):
        fastmerge.merge_state_dicts("task_arithmetic", states, base=base, weight=0.5, missing="union")
    with pytest.raises(ConfigError, match=r"missing='both' is no rule .* use one of error, union, intersection"):
        fastmerge.merge_state_dicts("linear", states, weight=list(WEIGHTS), missing="both")


def test_merge_state_dicts_names_what_is_not_a_tensor():
    """Training checkpoints keep a step or optimizer state beside the weights; a tensor passed
    where a state dict belongs is no mapping."""
    import fastmerge
    from fastmerge.errors import ConfigError, PlanError

    w = torch.ones(3)
    with pytest.raises(PlanError, match="state dict 1: 'step' is a int, not a tensor"):
        fastmerge.merge_state_dicts("linear", [{"w": w}, {"w": w, "step": 5}], weight=1.0)
    with pytest.raises(ConfigError, match="state dict 0 is a Tensor, not a mapping"):
        fastmerge.merge_state_dicts("linear", [w, w], weight=1.0)


def test_an_in_memory_merge_never_hands_back_an_input():
    """passthrough (and a merge needing no conversion) may return an input as it is: the
    caller gets a tensor of its own, so changing it leaves the input as it was."""
    import fastmerge

    a = torch.arange(4.0)
    out = fastmerge.merge_tensors("passthrough", [a])
    merged = fastmerge.merge_state_dicts("passthrough", [{"a": a}])
    for result in (out, merged["a"]):
        assert torch.equal(result, a) and result.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
        result += 1
    assert torch.equal(a, torch.arange(4.0))
