"""RECALL end to end through fastmerge.run on tiny Llama checkpoints, and its bad-input errors."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file

import fastmerge
from fastmerge.errors import CheckpointError, ConfigError, MissingExtraError, PlanError
from fastmerge.ops.blend import blend_reference
from fastmerge.representations.toy import save_toy_llama

SAMPLES = [
    "the cat sat on the mat", "dogs bark at night", "a quick brown fox", "numbers 12 34 56",
    "what is the answer?", "rain falls in spain", "merge the models, keep the skills",
    "one two three four", "hello world", "zebra crossing ahead", "x y z", "it is late; go home",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """old: a random 3-layer Llama; new: the same model with blocks 1 and 2 changed (a "fine-tune"
    that leaves the embeddings and block 0 alone)."""
    root = tmp_path_factory.mktemp("recall")
    old = save_toy_llama(root / "old", seed=0, num_layers=3)
    new = root / "new"
    shutil.copytree(old, new)
    tensors = load_file(new / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        if name.startswith(("model.layers.1.", "model.layers.2.")) and t.dim() == 2:
            tensors[name] = t + 0.5 * torch.randn(t.shape, generator=g)
    save_file(tensors, new / "model.safetensors", metadata={"format": "pt"})
    return old, new


def _config(old, new, **params):
    return {
        "merge_method": "recall",
        "models": [{"model": str(old)}, {"model": str(new)}],
        "parameters": {"samples": SAMPLES, "num_typical": 4, "batch_size": 3, **params},
        "dtype": "float32",
    }


def test_end_to_end_merge(models, tmp_path):
    old, new = models
    report = fastmerge.run(_config(old, new), tmp_path / "out", device="cpu", quiet=True)
    out = report.output_dir
    record = json.loads((out / "recall_weights.json").read_text())
    assert (out / "recall_weights.png").stat().st_size > 0
    assert record["models"] == [str(old), str(new)] and record["new_model"] == str(new)
    assert record["rows"] == ["embeddings", "layer 0", "layer 1", "layer 2"]
    assert len(record["typical_samples"]) == 4
    weights = torch.tensor(record["weights"], dtype=torch.float64)
    # Untouched embeddings and block 0 represent the samples identically -> equal weights;
    # changed blocks drift away -> the new model gets more weight there.
    torch.testing.assert_close(weights[:2], torch.full((2, 2), 0.5, dtype=torch.float64), rtol=0, atol=1e-6)
    assert (weights[2:, 1] > 0.5).all()

    merged = load_file(out / "model.safetensors")
    inputs = [load_file(old / "model.safetensors"), load_file(new / "model.safetensors")]
    for name, tensor in merged.items():
        if name.startswith("model.layers."):
            row = int(name.split(".")[2]) + 1
        elif name == "model.embed_tokens.weight":
            row = 0
        else:
            row = 3
        expected = blend_reference([m[name] for m in inputs], weights[row].tolist(), out_dtype=torch.float32)
        assert torch.equal(tensor, expected), name


def test_new_marker_and_base_candidate(models, tmp_path):
    old, new = models
    base = save_toy_llama(tmp_path / "base", seed=7, num_layers=3)
    config = _config(new, old)
    config["models"][0]["parameters"] = {"new": True}
    config["base_model"] = str(base)
    report = fastmerge.run(config, tmp_path / "out", device="cpu", quiet=True)
    record = json.loads((report.output_dir / "recall_weights.json").read_text())
    assert record["new_model"] == str(new) and record["models"] == [str(new), str(old), "base"]
    weights = torch.tensor(record["weights"])
    # where old and new still agree (embeddings, block 0), the unrelated random base weighs least
    assert (weights[:2, 2] < weights[:2, 1]).all()
    torch.testing.assert_close(weights[:2, 0], weights[:2, 1])


def test_samples_file_missing(models, tmp_path):
    old, new = models
    with pytest.raises(ConfigError, match="does not exist"):
        fastmerge.run(_config(old, new, samples=str(tmp_path / "none.jsonl")), tmp_path / "out", device="cpu", quiet=True)
    assert not (tmp_path / "out").exists()


def test_samples_required(models, tmp_path):
    old, new = models
    config = _config(old, new)
    del config["parameters"]["samples"]
    with pytest.raises(ConfigError, match="samples"):
        fastmerge.run(config, tmp_path / "out", device="cpu", quiet=True)


def test_two_new_models(models, tmp_path):
    old, new = models
    config = _config(old, new)
    for m in config["models"]:
        m["parameters"] = {"new": True}
    with pytest.raises(ConfigError, match="only one model"):
        fastmerge.run(config, tmp_path / "out", device="cpu", quiet=True)


def test_different_hidden_sizes(models, tmp_path):
    old, _ = models
    other = save_toy_llama(tmp_path / "wide", hidden_size=64, num_layers=3)
    with pytest.raises((PlanError, CheckpointError), match="hidden|shape"):
        fastmerge.run(_config(old, other), tmp_path / "out", device="cpu", quiet=True)


def test_different_layer_counts_in_prepare(models, tmp_path):
    """The planner may merge mismatched tensors by name; RECALL itself refuses different depths."""
    from fastmerge.io.checkpoint import Checkpoint
    from fastmerge.methods.recall import _skeletons

    old, _ = models
    deep = save_toy_llama(tmp_path / "deep", num_layers=4)
    with pytest.raises(PlanError, match="3 layers x 32.*4 layers x 32"):
        _skeletons([Checkpoint(old), Checkpoint(deep)], ["old", "deep"])


def test_without_transformers(models, tmp_path, monkeypatch):
    import sys

    old, new = models
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"fastmerge\[models\]"):
        fastmerge.run(_config(old, new), tmp_path / "out", device="cpu", quiet=True)


def _with_nan(source, target, tensor="model.layers.0.mlp.up_proj.weight"):
    """A copy of the model at `source` with one NaN in `tensor`."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor][0, 0] = float("nan")
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("broken", ["old", "new"])
def test_nan_weight_names_the_model_and_layer(models, tmp_path, broken):
    """A NaN old model used to look identical to the new one (NaN distance -> 0, similarity 1),
    and a NaN new model crashed k-means++; both are now refused right after capture."""
    old, new = models
    bad = _with_nan(old if broken == "old" else new, tmp_path / "nan_model")
    pair = (bad, new) if broken == "old" else (old, bad)
    with pytest.raises(PlanError, match=rf"model {bad}: its hidden states at layer 0 are not finite"):
        fastmerge.run(_config(*pair), tmp_path / "out", device="cpu", quiet=True)
    assert not (tmp_path / "out").exists()


def test_backend_reaches_the_similarity_kernel(models, tmp_path, monkeypatch):
    from fastmerge import ops

    seen = []
    real = ops.rbf_similarity

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "rbf_similarity", spy)
    old, new = models
    fastmerge.run(_config(old, new), tmp_path / "out", device="cpu", quiet=True, backend="reference")
    assert seen == ["reference"]


@pytest.mark.parametrize(
    "params",
    [{"num_typical": 1}, {"samples": ["one line only"]}, {"samples": ["the same text"] * 6}],
    ids=["num_typical_1", "single_sample", "identical_samples"],
)
def test_median_heuristic_needs_two_distinct_samples(models, tmp_path, params):
    """With one distinct sample sigma^2 = D/2 and every similarity is exp(-1): weights that ignore the models."""
    old, new = models
    with pytest.raises(ConfigError, match="at least 2 distinct typical samples.*num_typical >= 2.*sigma"):
        fastmerge.run(_config(old, new, **params), tmp_path / "out", device="cpu", quiet=True)
    assert not (tmp_path / "out").exists()


def test_one_sample_is_fine_with_a_given_sigma(models, tmp_path):
    old, new = models
    report = fastmerge.run(_config(old, new, num_typical=1, sigma=100.0), tmp_path / "out", device="cpu", quiet=True)
    assert len(json.loads((report.output_dir / "recall_weights.json").read_text())["typical_samples"]) == 1
