from pathlib import Path

import pytest
import torch

from fastmerge.errors import CheckpointError
from fastmerge.pruning.mask_file import MaskSet, architecture_fingerprint, load_masks

SHAPES = {"a.weight": (5, 7), "b.weight": (3, 8), "c.bias": (3,)}


def _masks() -> MaskSet:
    g = torch.Generator().manual_seed(0)
    dense = {n: torch.rand(SHAPES[n], generator=g) > 0.5 for n in ("a.weight", "b.weight")}
    return MaskSet.from_dense(dense, architecture_fingerprint(SHAPES.items()), {"score": "magnitude"})


def test_round_trip_is_bit_exact(tmp_path: Path):
    masks = _masks()
    masks.save(tmp_path / "masks.safetensors")
    loaded = load_masks(tmp_path)
    assert loaded.shapes == masks.shapes and loaded.architecture == masks.architecture
    assert loaded.info["score"] == "magnitude"
    for name in masks.packed:
        assert torch.equal(loaded.packed[name], masks.packed[name])
        assert torch.equal(loaded.dense(name), masks.dense(name))
    loaded.save(tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "masks.safetensors").read_bytes()


def test_wrong_shape_and_other_model_are_refused(tmp_path: Path):
    masks = _masks()
    with pytest.raises(CheckpointError, match="a.weight"):
        masks.check_tensor("a.weight", (7, 5))
    other = {**SHAPES, "b.weight": (4, 8)}
    with pytest.raises(CheckpointError, match="another architecture"):
        masks.check_model(other, "model X")
    masks.check_model(SHAPES, "same model")


def test_foreign_file_is_refused(tmp_path: Path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "masks.safetensors"))
    with pytest.raises(CheckpointError, match="not a fastmerge mask file"):
        load_masks(tmp_path / "masks.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_masks(tmp_path / "missing.safetensors")


def test_a_tensor_the_model_lacks_is_refused_even_with_a_matching_fingerprint():
    """The fingerprint is only metadata: an edited file can match it and still name a tensor the
    model does not have (this used to be a KeyError)."""
    forged = MaskSet.from_dense({"a.wieght": torch.ones(5, 7, dtype=torch.bool)}, architecture_fingerprint(SHAPES.items()))
    with pytest.raises(CheckpointError, match="it masks a.wieght, which model X does not have"):
        forged.check_model(SHAPES, "model X")
