"""`fastmerge layershuffle` / `fastmerge-layershuffle`: seeded random layer stacks.

The expected draws are re-derived here from the rule in fastmerge/layershuffle.py's docstring
with Python's seeded generator; the merged models are checked layer by layer against the
models each layer was drawn from.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml

from _support import load_dir
from fastmerge.cli import main, mergekit_layershuffle_main
from fastmerge.demo import LlamaShape, fine_tune_of, make_state, write_checkpoint
from fastmerge.errors import ConfigError
from fastmerge.layershuffle import shuffle_config
from fastmerge.plan import layer_index

SHAPE = LlamaShape(hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("shuffle")
    base = make_state(SHAPE, 0)
    return [str(write_checkpoint(root / f"m{i}", fine_tune_of(base, i, scale=0.5), SHAPE, dtype=torch.float32))
            for i in range(3)]


def _layers(config: dict) -> list[tuple[str, int]]:
    """(model, source layer) of each output layer, in order."""
    return [(s["sources"][0]["model"], i) for s in config["slices"] for i in range(*s["sources"][0]["layer_range"])]


def test_each_output_layer_is_the_same_layer_of_a_drawn_model():
    config = shuffle_config(["a", "b", "c"], [6, 6, 6], [0.5, 0.3, 0.2], seed=7)
    rng = random.Random(7)
    drawn = [rng.choices(["a", "b", "c"], weights=[0.5, 0.3, 0.2])[0] for _ in range(6)]
    assert _layers(config) == list(zip(drawn, range(6)))
    models = [s["sources"][0]["model"] for s in config["slices"]]
    assert all(x != y for x, y in zip(models, models[1:])), "runs of one model are one slice"
    assert config["merge_method"] == "passthrough" and "dtype" not in config
    assert shuffle_config(["a", "b", "c"], [6, 6, 6], [0.5, 0.3, 0.2], seed=7) == config


def test_weights_are_odds_and_default_to_equal():
    never_c = shuffle_config(["a", "b", "c"], [40, 40, 40], [1, 1, 0], seed=1)
    assert {m for m, _ in _layers(never_c)} == {"a", "b"}
    even = [m for seed in range(20) for m, _ in _layers(shuffle_config(["a", "b"], [50, 50], seed=seed))]
    assert 0.4 < even.count("a") / len(even) < 0.6
    assert len(_layers(shuffle_config(["a", "b"], [5, 9]))) == 5, "as many layers as the first model"


def test_full_random_takes_a_fraction_of_each_model_from_anywhere_in_it():
    config = shuffle_config(["a", "b"], [10, 4], [0.5, 1.0], full_random=True, seed=3, fp16=True)
    layers = _layers(config)
    assert len(config["slices"]) == len(layers) == 5 + 4
    assert sum(m == "a" for m, _ in layers) == 5 and sum(m == "b" for m, _ in layers) == 4
    assert all(0 <= i < (10 if m == "a" else 4) for m, i in layers)
    rng = random.Random(3)
    expected = [("a", rng.randrange(10)) for _ in range(5)] + [("b", rng.randrange(4)) for _ in range(4)]
    rng.shuffle(expected)
    assert layers == expected and config["dtype"] == "float16"


@pytest.mark.parametrize("args, kwargs, message", [
    (([], []), {}, "--model: give at least one model"),
    ((["a", "b"], [4, 4], [1.0]), {}, "--weight: 1 values for 2 models"),
    ((["a"], [4], [-1.0]), {}, "--weight: -1.0 is negative"),
    ((["a", "b"], [4, 4], [0.0, 0.0]), {}, "at least one weight must be positive"),
    ((["a"], [4]), {"full_random": True}, "--full-random needs one --weight per model"),
    ((["a"], [4], [0.1]), {"full_random": True}, "give no layers at all"),
    ((["a"], [0]), {}, "a: no layers found"),
])
def test_bad_flags_name_the_flag(args, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        shuffle_config(*args, **kwargs)


def test_the_command_stacks_the_drawn_layers(models, tmp_path, capsys):
    out, written = tmp_path / "out", tmp_path / "shuffle.yml"
    args = [str(out), *[a for m in models for a in ("-m", m)], "-w", "1", "-w", "2", "-w", "1", "--seed", "4",
            "--write-yaml", str(written), "--quiet"]
    assert main(["layershuffle", *args]) == 0
    config = yaml.safe_load(written.read_text())
    assert config == shuffle_config(models, [6, 6, 6], [1, 2, 1], seed=4)
    merged, sources = load_dir(out), [load_dir(Path(m)) for m in models]
    first, last = (models.index(config["slices"][i]["sources"][0]["model"]) for i in (0, -1))
    for out_layer, (model, layer) in enumerate(_layers(config)):
        source = sources[models.index(model)]
        names = [n for n in source if layer_index(n) == layer]
        assert names
        for name in names:
            assert torch.equal(merged[name.replace(f"layers.{layer}.", f"layers.{out_layer}.")], source[name]), name
    for name in (n for n in merged if layer_index(n) is None):  # as in mergekit: before the layers from the
        source = sources[first if "embed_tokens" in name else last]  # first slice's model, after them from the last's
        assert torch.equal(merged[name], source[name]), name
    capsys.readouterr()
    assert main(["layershuffle", str(tmp_path / "dry"), "-m", models[0], "--print-yaml", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["merge_method"] == "passthrough"
    assert not (tmp_path / "dry").exists()
    assert main(["layershuffle", str(tmp_path / "o2"), "-m", models[0], "--write-yaml", str(tmp_path / "no" / "s.yml")]) == 2
    assert "--write-yaml" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_the_drop_in_seeds_with_random_seed_and_exits_2_on_bad_flags(models, tmp_path, capsys):
    flags = ["-m", models[0], "-m", models[1], "--full-random", "-w", "0.5", "-w", "0.5", "--fp16"]
    assert mergekit_layershuffle_main([str(tmp_path / "a"), *flags, "--random-seed", "9", "--print-yaml", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == shuffle_config(models[:2], [6, 6], [0.5, 0.5], full_random=True,
                                                                    seed=9, fp16=True)
    assert mergekit_layershuffle_main([str(tmp_path / "b"), *flags, "--quiet"]) == 0
    assert {t.dtype for t in load_dir(tmp_path / "b").values()} == {torch.float16}
    assert mergekit_layershuffle_main([str(tmp_path / "c"), "-m", models[0], "-w", "1", "-w", "2"]) == 2
    assert "--weight: 2 values for 1 models" in capsys.readouterr().err and not (tmp_path / "c").exists()
