"""Config parsing (mergekit schema) and parameter evaluation (gradients, filters, precedence)."""

from __future__ import annotations

import pytest
import torch

import fastmerge
from _support import write_config
from fastmerge.config import Conditional, evaluate_setting, load_config, parse_config
from fastmerge.errors import ConfigError


def minimal(**extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": "/m/a", "parameters": {"weight": 1}}], **extra}


def test_yaml_file_text_and_dict_agree(tmp_path):
    data = minimal(dtype="bfloat16", parameters={"normalize": False})
    from_file = load_config(write_config(tmp_path / "c.yml", data))
    from_text = load_config((tmp_path / "c.yml").read_text())
    from_dict = load_config(data)
    for spec in (from_file, from_text, from_dict):
        assert spec.merge_method == "linear"
        assert spec.dtype == torch.bfloat16
        assert spec.models[0].model == "/m/a"
        assert spec.parameters == {"normalize": False}


def test_slices_with_layer_ranges():
    spec = parse_config({
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "/a", "layer_range": [0, 4]}]},
            {"sources": [{"model": "/b", "layer_range": [2, 6]}], "parameters": {"scale": 0.5}},
        ],
    })
    assert [s.layer_count for s in spec.slices] == [4, 4]
    assert spec.slices[1].sources[0].layer_range == (2, 6)
    assert spec.referenced_models() == ["/a", "/b"]


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"models": [{"model": "/a"}]}, "merge_method"),
        (minimal(extra_key=1), "extra_key"),
        (minimal(dtype="float8"), "dtype"),
        (minimal(out_dtype=3), "out_dtype"),
        ({"merge_method": "linear"}, "models"),
        ({**minimal(), "slices": [{"sources": [{"model": "/a", "layer_range": [0, 2]}]}]}, "exactly one"),
        ({"merge_method": "x", "slices": [{"sources": [{"model": "/a", "layer_range": [3, 1]}]}]}, "layer_range"),
        ({"merge_method": "x", "slices": [{"sources": [{"model": "/a", "layer_range": [0, 2]}, {"model": "/b", "layer_range": [0, 3]}]}]}, "same number of layers"),
        ({"merge_method": "x", "models": [{"model": "/a", "paramters": {}}]}, "models[0].paramters"),
        (minimal(parameters={"weight": {"filter": "mlp"}}), "value"),
        (minimal(parameters={"weight": [[1, 2]]}), "parameters.weight"),
        (minimal(tokenizer={"source": "base", "pad": 8}), "tokenizer.pad"),
        (minimal(base_model=5), "base_model"),
    ],
)
def test_bad_configs_name_the_key(config, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(config)
    assert fragment in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("merge_method: [linear\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("t", [0.0, 0.1, 0.25, 0.5, 0.8, 1.0])
def test_gradient_is_piecewise_linear(t):
    gradient = [0.0, 1.0, 0.5, 0.5, 2.0]
    # independent formula: the anchors sit at k / (n - 1); interpolate between neighbours
    anchors = [k / (len(gradient) - 1) for k in range(len(gradient))]
    k = max(i for i, a in enumerate(anchors) if a <= t)
    expected = gradient[k] if k == len(gradient) - 1 else gradient[k] + (gradient[k + 1] - gradient[k]) * (t - anchors[k]) / (anchors[k + 1] - anchors[k])
    assert evaluate_setting(gradient, "model.layers.0.mlp", t) == pytest.approx(expected, abs=1e-12)


def test_filters_first_match_wins():
    setting = [Conditional(0.1, "self_attn"), Conditional(0.2, "mlp"), Conditional([0.0, 1.0], None)]
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.2
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate_setting(setting, "model.norm.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting([Conditional(1.0, "mlp")], "model.norm.weight", 0.0) is None


def test_precedence_source_over_slice_over_top(tmp_path):
    from fastmerge.demo import LlamaShape, make_state, write_checkpoint

    shape = LlamaShape(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=16)
    a = write_checkpoint(tmp_path / "a", make_state(shape, 1), shape)
    b = write_checkpoint(tmp_path / "b", make_state(shape, 2), shape)
    plan = fastmerge.prepare_plan({
        "merge_method": "linear",
        "slices": [{
            "sources": [
                {"model": str(a), "layer_range": [0, 2], "parameters": {"weight": 0.9}},
                {"model": str(b), "layer_range": [0, 2]},
            ],
            "parameters": {"weight": 0.4, "normalize": False},
        }],
        "parameters": {"weight": 0.1, "normalize": True},
    })
    tensor = next(t for t in plan.tensors if t.layer == 1)
    assert [p["weight"] for p in tensor.params] == [0.9, 0.4]
    assert tensor.global_params == {"normalize": False}


def test_a_key_given_twice_is_an_error_naming_it_and_its_line(tmp_path):
    """PyYAML keeps the last of two equal keys without a word (so does mergekit): a second
    `merge_method:` silently changed the method, and the first one's parameters then read as
    unknown ones."""
    from fastmerge.config import parse_yaml_documents

    text = "merge_method: ties\nmodels:\n  - model: /m\n    parameters: {weight: 1, weight: 2}\n"
    with pytest.raises(ConfigError, match=r"key 'weight' is given twice"):
        load_config(text)
    path = tmp_path / "m.yml"
    path.write_text(text.replace("weight: 1, weight: 2", "weight: 1") + "merge_method: linear\n")
    with pytest.raises(ConfigError, match=r"key 'merge_method' is given twice\s+in .*line 5"):
        load_config(path)
    assert parse_yaml_documents("a: 1\n---\na: 2\n") == [{"a": 1}, {"a": 2}]  # the same key in two documents is fine


def test_a_parameter_set_to_null_takes_its_default():
    """As README's RECALL example writes `sigma: null` (refused as 'must be a scalar' before)."""
    spec = load_config("merge_method: ties\nmodels:\n  - model: m\n    parameters: {weight: 0.5, density: null}\n"
                       "parameters: {lambda: null}\n")
    assert spec.models[0].parameters == {"weight": 0.5} and spec.parameters == {}
