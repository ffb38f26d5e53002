"""`fastmerge legacy` / `fastmerge-legacy`: mergekit-legacy's flags as a merge config.

The expected configs are written out by hand here from mergekit-legacy's rules (fastmerge/legacy.py's
docstring); the merges are compared with `fastmerge run` on those configs, and with
mergekit-legacy itself where it is installed (next to FASTMERGE_MERGEKIT_YAML, or on PATH).
"""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml

from _support import assert_matches_mergekit, load_dir, mergekit_script, write_config
from fastmerge import run
from fastmerge.cli import main, mergekit_legacy_main
from fastmerge.demo import LlamaShape, fine_tune_of, make_state, write_checkpoint
from fastmerge.errors import ConfigError
from fastmerge.legacy import legacy_config

SHAPE = LlamaShape(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("legacy")
    base = make_state(SHAPE, 0)
    paths = {"base": write_checkpoint(root / "base", base, SHAPE, dtype=torch.float32)}
    for i in (1, 2):
        paths[f"ft{i}"] = write_checkpoint(root / f"ft{i}", fine_tune_of(base, i, scale=0.3), SHAPE, dtype=torch.float32)
    return {name: str(path) for name, path in paths.items()}


def test_one_value_goes_to_every_model_the_base_included():
    built = legacy_config(["a", "b"], base_model="base", densities=[0.5], weights=[0.7])
    assert built.config == {
        "merge_method": "ties", "base_model": "base",
        "models": [{"model": "a", "parameters": {"density": 0.5, "weight": 0.7}},
                   {"model": "b", "parameters": {"density": 0.5, "weight": 0.7}},
                   {"model": "base", "parameters": {"density": 0.5, "weight": 0.7}}],
        "parameters": {"normalize": True},
    }
    assert built.notes == []


def test_values_go_to_the_models_in_order_and_a_merged_base_is_not_added_twice():
    built = legacy_config(["a", "base"], base_model="base", method="task_arithmetic", weights=[0.25], bf16=True,
                          normalize=False)
    assert [m["model"] for m in built.config["models"]] == ["a", "base"]
    assert built.config["dtype"] == "bfloat16" and built.config["parameters"] == {"normalize": False}
    fewer = legacy_config(["a", "b", "c"], method="linear", weights=[1.0, 2.0])
    assert [m["parameters"] for m in fewer.config["models"]] == [{"weight": 1.0}, {"weight": 2.0}, {}]
    assert "dtype" not in fewer.config and "base_model" not in fewer.config


def test_slerp_takes_its_t_from_the_one_weight_and_drops_what_it_has_no_use_for():
    built = legacy_config(["ft"], base_model="base", method="slerp", weights=[0.3], normalize=False, int8_mask=True,
                          naive_count=True)
    assert built.config == {"merge_method": "slerp", "base_model": "base",
                            "models": [{"model": "ft", "parameters": {}}, {"model": "base", "parameters": {}}],
                            "parameters": {"t": 0.3}}
    assert len(built.notes) == 3
    assert "normalize: false" in built.notes[0] and "int8_mask: true" in built.notes[1] and "--naive-count" in built.notes[2]
    assert legacy_config(["ft"], base_model="base", method="slerp", weights=[0.3]).notes == []


@pytest.mark.parametrize("kwargs, message", [
    ({"merge": []}, "--merge: give at least one model"),
    ({"merge": ["a"], "densities": [0.5, 0.4, 0.3]}, r"--density: 3 values for 1 models"),
    ({"merge": ["a"], "base_model": "b", "weights": [1, 2, 3]}, r"--weight: 3 values for 2 models"),
    ({"merge": ["a"], "base_model": "b", "method": "slerp", "weights": [0.1, 0.2]}, "slerp takes exactly one"),
    ({"merge": ["a"], "method": "average"}, "unknown merge_method 'average'"),
])
def test_bad_flags_name_the_flag(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        legacy_config(**kwargs)


def test_the_command_merges_what_the_config_says(models, tmp_path, capsys):
    """`fastmerge legacy` gives the bytes `fastmerge run` gives for the config written by hand."""
    args = [str(tmp_path / "legacy"), "--merge", models["ft1"], "--merge", models["ft2"], "--base-model", models["base"],
            "--density", "0.6", "--weight", "0.7", "--weight", "0.3", "--print-yaml", "--quiet"]
    assert main(["legacy", *args]) == 0
    printed = capsys.readouterr().out
    config = {"merge_method": "ties", "base_model": models["base"],
              "models": [{"model": models["ft1"], "parameters": {"density": 0.6, "weight": 0.7}},
                         {"model": models["ft2"], "parameters": {"density": 0.6, "weight": 0.3}},
                         {"model": models["base"], "parameters": {"density": 0.6}}],
              "parameters": {"normalize": True}}
    assert yaml.safe_load(printed.split("\n\n")[0]) == config
    run(write_config(tmp_path / "ties.yml", config), tmp_path / "run", quiet=True)
    ours, expected = load_dir(tmp_path / "legacy"), load_dir(tmp_path / "run")
    assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in ours)


def test_the_drop_in_takes_mergekits_flags_and_exits_2_on_bad_ones(models, tmp_path, capsys):
    out = tmp_path / "slerp"
    assert mergekit_legacy_main([str(out), "--method", "slerp", "--merge", models["ft1"], "--base-model", models["base"],
                                 "--weight", "0.4", "--bf16", "--naive-count", "--no-write-model-card",
                                 "--random-seed", "3", "-j", "1"]) == 0
    err = capsys.readouterr().err
    assert "--naive-count ignored" in err and "write-model-card" not in err  # --no-...: what fastmerge does anyway
    assert {t.dtype for t in load_dir(out).values()} == {torch.bfloat16}
    assert mergekit_legacy_main([str(tmp_path / "bad"), "--method", "slerp", "--merge", models["ft1"],
                                 "--base-model", models["base"]]) == 2
    assert "--weight: slerp takes exactly one (its t), got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


MERGEKIT_LEGACY = mergekit_script("mergekit-legacy")


@pytest.mark.skipif(MERGEKIT_LEGACY is None, reason="mergekit-legacy not installed")
@pytest.mark.parametrize("flags", [
    ["--density", "0.5", "--weight", "0.6", "--weight", "0.4", "--naive-count", "--int8-mask"],
    ["--method", "task_arithmetic", "--weight", "0.5", "--no-normalize"],
    ["--method", "linear", "--weight", "1", "--weight", "3", "--weight", "2"],
    ["--method", "slerp", "--weight", "0.3"],
])
def test_matches_mergekit_legacy(models, tmp_path, flags):
    """The same flags through mergekit-legacy 0.1.5: the same tensors, within 1e-6 of each
    tensor's largest value (the bound of the mergekit-yaml parity tests). In fp32 only: with
    --bf16 mergekit does its arithmetic in bf16 and fastmerge in fp32 (docs/methods.md)."""
    merge = ["--merge", models["ft1"]] + ([] if "slerp" in flags else ["--merge", models["ft2"]])
    common = [*merge, "--base-model", models["base"], *flags]
    subprocess.run([MERGEKIT_LEGACY, str(tmp_path / "mk"), *common, "--no-write-model-card", "--quiet"],
                   check=True, capture_output=True)
    assert mergekit_legacy_main([str(tmp_path / "fm"), *common, "--quiet"]) == 0
    assert_matches_mergekit(load_dir(tmp_path / "fm"), load_dir(tmp_path / "mk"))
