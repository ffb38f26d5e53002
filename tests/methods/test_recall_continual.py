"""Continual merging (fastmerge.continual) with RECALL and with a data-free method."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file

from fastmerge.continual import run_continual
from fastmerge.errors import ConfigError
from fastmerge.representations.toy import save_toy_llama


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
    """Three fine-tunes in order: each one the previous plus a small change."""
    root = tmp_path_factory.mktemp("continual")
    previous = save_toy_llama(root / "ft1", seed=0, num_layers=2)
    paths = [previous]
    g = torch.Generator().manual_seed(0)
    for i in (2, 3):
        path = root / f"ft{i}"
        shutil.copytree(previous, path)
        tensors = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in load_file(path / "model.safetensors").items()}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        paths.append(previous := path)
    return paths


def test_recall_after_each_step(sequence, tmp_path):
    samples = [["first task text", "more of it"], ["second task", "words words"], ["third one", "last task, last words"]]
    steps = run_continual(sequence, tmp_path / "out", samples=samples, params={"num_typical": 2}, device="cpu", quiet=True, dtype="float32")
    assert steps[0] == sequence[0]
    assert [p.name for p in steps[1:]] == ["step_02", "step_03"]
    for previous, step, new in zip(steps[:-1], steps[1:], sequence[1:]):
        record = json.loads((step / "recall_weights.json").read_text())
        assert record["models"] == [str(previous), str(new)]
        merged = load_file(step / "model.safetensors")["model.norm.weight"]
        w = record["weights"][-1]
        expected = w[0] * load_file(previous / "model.safetensors")["model.norm.weight"].double() + w[1] * load_file(new / "model.safetensors")["model.norm.weight"].double()
        torch.testing.assert_close(merged.double(), expected, rtol=1e-6, atol=1e-6)


def test_any_method_with_base(sequence, tmp_path):
    base = save_toy_llama(tmp_path / "base", seed=9, num_layers=2)
    steps = run_continual(sequence, tmp_path / "out", method="task_arithmetic", base=base, model_params={"weight": 1.0}, device="cpu", quiet=True)
    assert [p.name for p in steps] == ["step_01", "step_02", "step_03"]
    # step 1 is base + 1.0 * (ft1 - base), i.e. the first fine-tune up to fp32 rounding
    first = load_file(steps[0] / "model.safetensors")
    torch.testing.assert_close(first["model.norm.weight"], load_file(sequence[0] / "model.safetensors")["model.norm.weight"])


def test_samples_per_checkpoint(sequence, tmp_path):
    with pytest.raises(ConfigError, match="one samples entry per checkpoint"):
        run_continual(sequence, tmp_path / "out", samples=[["a"]])
    with pytest.raises(ConfigError, match="needs each step's samples"):
        run_continual(sequence, tmp_path / "out")
