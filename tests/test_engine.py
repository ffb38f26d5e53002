"""End-to-end merges checked bit for bit against an independent computation of the DESIGN.md
arithmetic contract: fp32, inputs in config order, one fused multiply-add per step, one
round-to-nearest-even into the output dtype."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

import fastmerge
from _support import TINY, fma_f32, load_dir, write_config
from fastmerge.demo import make_state, write_checkpoint


def expected_linear(models: list[dict[str, torch.Tensor]], weights: list[float], normalize: bool, dtype: torch.dtype):
    out = {}
    total = sum(weights)
    w32 = [torch.tensor(w / total if normalize else w, dtype=torch.float32) for w in weights]
    for name in models[0]:
        acc = torch.zeros(models[0][name].shape, dtype=torch.float32)
        for w, model in zip(w32, models):
            acc = fma_f32(w, model[name].float(), acc)
        out[name] = acc.to(dtype)
    return out


def expected_task_arithmetic(base, models, weight_of, lam: float, dtype: torch.dtype):
    """weight_of(name, model_index) -> the weight the config gives that model for that tensor."""
    out = {}
    lam32 = torch.tensor(lam, dtype=torch.float32)
    for name, b in base.items():
        b32 = b.float()
        acc = torch.zeros(b.shape, dtype=torch.float32)
        for i, model in enumerate(models):
            acc = fma_f32(torch.tensor(weight_of(name, i), dtype=torch.float32), model[name].float() - b32, acc)
        out[name] = fma_f32(lam32, acc, b32).to(dtype)
    return out


def assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name].view(torch.int16) if tensor.dtype != torch.float32 else actual[name], tensor.view(torch.int16) if tensor.dtype != torch.float32 else tensor), name


@pytest.mark.parametrize("shard_size", ["30K", "5GB"])
def test_linear_sharded_bf16_is_bit_exact(tiny_models, tmp_path, shard_size):
    names = ["ft1", "ft2", "ft3"]
    weights = [0.5, 0.3, 0.2]
    config = {
        "merge_method": "linear",
        "models": [{"model": str(tiny_models[n]), "parameters": {"weight": w}} for n, w in zip(names, weights)],
        "dtype": "bfloat16",
    }
    report = fastmerge.run(config, tmp_path / "out", out_shard_size=shard_size, quiet=True)
    merged = load_dir(tmp_path / "out")
    expected = expected_linear([load_dir(tiny_models[n]) for n in names], weights, True, torch.bfloat16)
    assert_bitwise_equal(merged, expected)
    assert (len(report.shards) > 1) == (shard_size == "30K")
    assert report.tensors == len(expected)


def test_task_arithmetic_gradient_and_filter_is_bit_exact(tiny_models, tmp_path):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_models["base"]),
        "models": [
            {"model": str(tiny_models["ft1"]), "parameters": {"weight": [0.6, 0.2]}},
            {"model": str(tiny_models["ft2"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.25}]}},
            {"model": str(tiny_models["ft3"]), "parameters": {"weight": 0.3}},
        ],
        "parameters": {"lambda": 0.8},
        "dtype": "bfloat16",
    }
    fastmerge.run(config, tmp_path / "out", out_shard_size="40K", quiet=True)
    layers = TINY.num_hidden_layers

    def weight_of(name: str, i: int) -> float:
        if i == 0:  # gradient over depth: t = layer / (layers - 1), non-layer tensors t = 0
            t = int(name.split(".")[2]) / (layers - 1) if ".layers." in name else 0.0
            return 0.6 + (0.2 - 0.6) * t
        if i == 1:
            return 0.5 if "mlp" in name else 0.25
        return 0.3

    base = load_dir(tiny_models["base"])
    models = [load_dir(tiny_models[n]) for n in ("ft1", "ft2", "ft3")]
    assert_bitwise_equal(load_dir(tmp_path / "out"), expected_task_arithmetic(base, models, weight_of, 0.8, torch.bfloat16))


def test_single_file_and_bare_file_inputs(tmp_path):
    base_state = make_state(TINY, seed=3)
    other_state = make_state(TINY, seed=4)
    single = write_checkpoint(tmp_path / "single", base_state, TINY, max_shard_bytes=10**9)
    assert (single / "model.safetensors").exists()
    bare = write_checkpoint(tmp_path / "bare", other_state, None, max_shard_bytes=10**9) / "model.safetensors"
    config = {
        "merge_method": "linear",
        "models": [{"model": str(single), "parameters": {"weight": 1.0}}, {"model": str(bare), "parameters": {"weight": 3.0}}],
        "dtype": "float32",
    }
    fastmerge.run(config, tmp_path / "out", quiet=True)
    expected = expected_linear([load_dir(single), load_dir(bare.parent)], [1.0, 3.0], True, torch.float32)
    assert_bitwise_equal(load_dir(tmp_path / "out"), expected)


def test_output_directory_contents(tiny_models, tmp_path):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0}}],
        "out_dtype": "float16",
    }
    out = tmp_path / "out"
    report = fastmerge.run(config, out, out_shard_size="25K", quiet=True)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "mergekit_config.yml", "model.safetensors.index.json"} <= files
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report.shards)
    assert all(t.dtype == torch.float16 for t in load_dir(out).values())
    assert report.bytes_written == sum((out / s).stat().st_size for s in report.shards) - sum(
        8 + int.from_bytes((out / s).read_bytes()[:8], "little") for s in report.shards
    )
    assert report.peak_rss_bytes > 0 and report.seconds > 0
    # nothing but the output is left beside it (no temporary directories)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", "ft1", "ft2", "ft3", "out"])


def test_a_config_built_in_python_may_hold_paths_tuples_and_numpy_numbers(tiny_models, tmp_path):
    """They merge as the str, list and float YAML would give, and are written back as those: the
    YAML writer refused them, which failed the merge after every tensor was written."""
    python_config = {
        "merge_method": "task_arithmetic",
        "base_model": tiny_models["base"],
        "models": [{"model": tiny_models["ft1"], "parameters": {"weight": np.float64(0.7)}},
                   {"model": tiny_models["ft2"], "parameters": {"weight": (np.float32(0.25), 0.5)}}],
        "parameters": {"lambda": np.int64(1)},
    }
    yaml_config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 0.7}},
                   {"model": str(tiny_models["ft2"]), "parameters": {"weight": [0.25, 0.5]}}],
        "parameters": {"lambda": 1},
    }
    fastmerge.run(python_config, tmp_path / "python", quiet=True)
    fastmerge.run(write_config(tmp_path / "c.yml", yaml_config), tmp_path / "yaml", quiet=True)
    assert_bitwise_equal(load_dir(tmp_path / "python"), load_dir(tmp_path / "yaml"))
    assert yaml.safe_load((tmp_path / "python" / "mergekit_config.yml").read_text()) == yaml_config
    assert python_config["models"][1]["parameters"]["weight"][0] == np.float32(0.25)  # the caller's dict is left as it was


def test_threads_must_be_a_whole_number(tiny_models, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(fastmerge.FastmergeError, match="--threads must be an integer >= 1, got '2'"):
        fastmerge.run(config, tmp_path / "out", threads="2", quiet=True)


def test_no_copy_tokenizer(tiny_models, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0}}]}
    fastmerge.run(config, tmp_path / "out", copy_tokenizer=False, quiet=True)
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert (tmp_path / "out" / "config.json").exists()


def test_merge_is_byte_reproducible(tiny_models, tmp_path):
    config = write_config(tmp_path / "merge.yml", {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models[n]), "parameters": {"weight": 0.4}} for n in ("ft1", "ft2")],
    })
    fastmerge.run(config, tmp_path / "a", quiet=True, threads=1)
    fastmerge.run(config, tmp_path / "b", quiet=True, threads=2)
    for file in (tmp_path / "a").glob("*.safetensors"):
        assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes()


def test_overwrite_replaces_output(tiny_models, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0}}]}
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("model-00001-of-00002.safetensors", "merges.txt"):  # an earlier output's, this one has neither
        (out / stale).write_text("old")
    fastmerge.run(config, out, overwrite=True, quiet=True)
    assert not (out / "merges.txt").exists() and not (out / "model-00001-of-00002.safetensors").exists()
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def test_base_listed_among_models_is_not_a_task_vector(tiny_models, tmp_path):
    """mergekit configs often list the base in `models` too; it must not count as a model."""
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models["base"])}, {"model": str(tiny_models["ft1"]), "parameters": {"weight": 0.5}}],
    }
    fastmerge.run(config, tmp_path / "out", quiet=True)
    base, ft = load_dir(tiny_models["base"]), load_dir(tiny_models["ft1"])
    expected = expected_task_arithmetic(base, [ft], lambda n, i: 0.5, 1.0, torch.bfloat16)
    assert_bitwise_equal(load_dir(tmp_path / "out"), expected)


def test_merge_state_dicts_matches_run(tiny_models, tmp_path):
    base, ft1, ft2 = (load_dir(tiny_models[n]) for n in ("base", "ft1", "ft2"))
    merged = fastmerge.merge_state_dicts("task_arithmetic", [ft1, ft2], base=base, weight=[0.7, 0.3], lambda_=0.9)
    expected = expected_task_arithmetic(base, [ft1, ft2], lambda n, i: (0.7, 0.3)[i], 0.9, torch.bfloat16)
    assert_bitwise_equal(merged, expected)
    single = fastmerge.merge_tensors("linear", [ft1["model.norm.weight"], ft2["model.norm.weight"]], weight=1.0)
    assert torch.equal(single, expected_linear([{"x": ft1["model.norm.weight"]}, {"x": ft2["model.norm.weight"]}], [1.0, 1.0], True, torch.bfloat16)["x"])


def test_transformers_loads_the_merge(tiny_models, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = {"merge_method": "linear", "models": [{"model": str(tiny_models[n]), "parameters": {"weight": 1.0}} for n in ("ft1", "ft2")]}
    fastmerge.run(config, tmp_path / "out", quiet=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == TINY.num_hidden_layers
    expected = load_dir(tmp_path / "out")["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(model.state_dict()["model.layers.1.mlp.up_proj.weight"].to(expected.dtype), expected)
    shutil.rmtree(tmp_path / "out")


def test_output_directory_gets_normal_permissions(tiny_models, tmp_path):
    import os

    config = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0}}]}
    fastmerge.run(config, tmp_path / "out", quiet=True)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_failure_mid_stream_stops_the_prefetch_thread(tiny_models, tmp_path, monkeypatch):
    """A merge that fails on an early tensor leaves no reader thread blocked behind it."""
    import threading

    from fastmerge.errors import FastmergeError
    from fastmerge.methods.linear import Linear

    calls = []

    def failing(self, task):
        calls.append(task.name)
        if len(calls) == 2:
            raise FastmergeError("injected failure")
        return torch.zeros(task.inputs[0].shape, dtype=task.out_dtype)

    monkeypatch.setattr(Linear, "merge_tensor", failing)
    config = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(FastmergeError, match="injected"):
        fastmerge.run(config, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
    assert not [t for t in threading.enumerate() if t.name == "fastmerge-prefetch" and t.is_alive()]


def test_task_arithmetic_takes_mergekits_unused_parameters_and_says_they_did_nothing(tiny_models, tmp_path, capsys):
    """mergekit 0.1.5 declares density, rescale and int8_mask for task_arithmetic and ignores
    them; configs switched from ties or dare_ties keep them, so they run, with the same bytes."""
    from fastmerge.cli import main

    plain = {"merge_method": "task_arithmetic", "base_model": str(tiny_models["base"]), "parameters": {"normalize": True},
             "models": [{"model": str(tiny_models[n]), "parameters": {"weight": w}} for n, w in (("ft1", 0.6), ("ft2", 0.4))]}
    carried = {**plain, "parameters": {"normalize": True, "int8_mask": True, "rescale": True},
               "models": [{**m, "parameters": {**m["parameters"], "density": 0.5}} for m in plain["models"]]}
    outputs = []
    for i, config in enumerate((plain, carried)):
        path = tmp_path / f"c{i}.yml"
        path.write_text(yaml.safe_dump(config))
        assert main(["run", str(path), str(tmp_path / f"out{i}"), "--quiet"]) == 0
        outputs.append(load_dir(tmp_path / f"out{i}"))
    assert outputs[0].keys() == outputs[1].keys() and all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
    assert "task_arithmetic does not sparsify, so density and rescale had no effect" in capsys.readouterr().out


def test_without_dtype_mixed_inputs_give_the_promoted_dtype(tiny_models, tmp_path):
    """No `dtype`: a tensor stored in different float widths comes out in the wider one torch's
    promotion gives (mergekit's arithmetic on them does the same: bf16 with fp32 writes fp32),
    in either model order; one width stays as it is."""
    state = make_state(TINY, 7)
    wide = write_checkpoint(tmp_path / "fp32", state, TINY, dtype=torch.float32)
    narrow = write_checkpoint(tmp_path / "bf16", state, TINY, dtype=torch.bfloat16)
    for models, expected in (((narrow, wide), torch.float32), ((wide, narrow), torch.float32), ((narrow, narrow), torch.bfloat16)):
        config = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
        out = fastmerge.run(config, tmp_path / f"out-{len(list(tmp_path.iterdir()))}", quiet=True).output_dir
        assert {t.dtype for t in load_dir(out).values()} == {expected}
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(expected).removeprefix("torch.")
