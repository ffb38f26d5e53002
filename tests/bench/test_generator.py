"""The benchmark checkpoint generator: HF-shaped output, controllable task vectors, reuse."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.checkpoints import PRESETS, SPEC_FILE, GeneratorSpec, custom_shape, generate
from fastmerge.demo import LlamaShape
from fastmerge.errors import ConfigError
from fastmerge.io.checkpoint import Checkpoint

SMALL = LlamaShape(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=96)


def _load(path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as checkpoint:
        return {name: checkpoint.tensor(name).float().clone() for name, _ in SMALL.tensor_shapes()}


def test_models_have_llama_names_shapes_dtype_and_shards(tmp_path):
    spec = GeneratorSpec(SMALL, fine_tunes=2, shard_bytes=20_000)
    models = generate(tmp_path, spec)
    assert [p.name for p in models.all_models] == ["base", "ft-1", "ft-2"]
    for path in models.all_models:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert json.loads((path / "config.json").read_text())["hidden_size"] == 64
        with Checkpoint(path) as checkpoint:
            for name, dims in SMALL.tensor_shapes():
                info = checkpoint.info(name)
                assert (info.shape, info.dtype) == (dims, torch.bfloat16)


@pytest.mark.parametrize("delta_scale", [0.01, 0.1])
def test_task_vectors_have_the_requested_relative_size(tmp_path, delta_scale):
    models = generate(tmp_path, GeneratorSpec(SMALL, fine_tunes=1, delta_scale=delta_scale, dtype="F32"))
    base, tuned = _load(models.base), _load(models.fine_tunes[0])
    name = "model.layers.1.mlp.down_proj.weight"
    # Base matrices are N(0, 1/fan_in); the task vector is delta_scale times that.
    assert base[name].std().item() == pytest.approx(1 / math.sqrt(SMALL.intermediate_size), rel=0.1)
    relative = (tuned[name] - base[name]).std() / base[name].std()
    assert relative.item() == pytest.approx(delta_scale, rel=0.1)
    assert torch.equal(base["model.norm.weight"], torch.ones(SMALL.hidden_size))


def test_delta_density_sets_the_fraction_of_changed_weights(tmp_path):
    models = generate(tmp_path, GeneratorSpec(SMALL, fine_tunes=1, delta_density=0.3, dtype="F32"))
    base, tuned = _load(models.base), _load(models.fine_tunes[0])
    changed = sum(int((tuned[n] != base[n]).sum()) for n in base)
    total = sum(t.numel() for t in base.values())
    assert changed / total == pytest.approx(0.3, abs=0.02)


def test_fine_tunes_are_distinct_and_uncorrelated(tmp_path):
    models = generate(tmp_path, GeneratorSpec(SMALL, fine_tunes=2, dtype="F32"))
    base = _load(models.base)
    name = "model.layers.0.mlp.up_proj.weight"
    d1, d2 = ((_load(p)[name] - base[name]).flatten() for p in models.fine_tunes)
    cosine = torch.dot(d1, d2) / (d1.norm() * d2.norm())
    assert abs(cosine.item()) < 0.05


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = generate(tmp_path / "a", GeneratorSpec(SMALL, fine_tunes=1, seed=3))
    again = generate(tmp_path / "b", GeneratorSpec(SMALL, fine_tunes=1, seed=3))
    other = generate(tmp_path / "c", GeneratorSpec(SMALL, fine_tunes=1, seed=4))
    read = lambda models: [p.read_bytes() for p in models.files]  # noqa: E731
    assert read(first) == read(again)
    assert read(first) != read(other)


def test_a_matching_directory_is_reused_and_a_changed_spec_regenerates(tmp_path):
    spec = GeneratorSpec(SMALL, fine_tunes=1)
    assert not generate(tmp_path, spec).reused
    assert generate(tmp_path, spec).reused
    changed = generate(tmp_path, GeneratorSpec(SMALL, fine_tunes=1, delta_scale=0.05))
    assert not changed.reused
    assert json.loads((tmp_path / SPEC_FILE).read_text())["delta_scale"] == 0.05
    assert generate(tmp_path, GeneratorSpec(SMALL, fine_tunes=1, delta_scale=0.05), force=True).reused is False


def test_presets_have_the_documented_sizes():
    params = lambda shape: sum(math.prod(d) for _, d in shape.tensor_shapes())  # noqa: E731
    assert params(PRESETS["1b"]) == pytest.approx(1.10e9, rel=0.01)
    assert params(PRESETS["7b"]) == pytest.approx(6.74e9, rel=0.01)


@pytest.mark.parametrize(
    "kwargs", [{"fine_tunes": 0}, {"delta_density": 0.0}, {"delta_density": 1.5}, {"delta_scale": -1.0},
               {"dtype": "I8"}, {"shard_bytes": 0}],
)
def test_bad_specs_are_refused(kwargs):
    with pytest.raises(ConfigError):
        GeneratorSpec(SMALL, **kwargs)


def test_custom_shapes_are_parsed_and_checked():
    assert custom_shape("64,160,2,4,2,96") == SMALL
    for text in ("64,160,2", "64,160,2,5,1,96", "a,b,c,d,e,f"):
        with pytest.raises(ConfigError, match="--custom"):
            custom_shape(text)
