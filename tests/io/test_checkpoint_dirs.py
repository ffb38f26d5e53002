"""Checkpoint: every accepted directory form, pickle opt-in, index safety and consistency."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fastmerge.errors import CheckpointError
from fastmerge.io.checkpoint import Checkpoint


def _check_contents(checkpoint: Checkpoint, expected: dict[str, torch.Tensor], same_bytes) -> None:
    assert sorted(checkpoint.names) == sorted(expected)
    for name, tensor in expected.items():
        assert checkpoint.has(name)
        assert same_bytes(checkpoint.tensor(name), tensor), name
        assert checkpoint.info(name).shape == tuple(tensor.shape)
        checkpoint.prefetch(name)
        checkpoint.release(name)


def test_single_file_directory(model_dir, same_bytes):
    directory, tensors = model_dir
    with Checkpoint(directory) as ckpt:
        _check_contents(ckpt, tensors, same_bytes)
        assert ckpt.directory == directory.resolve() == ckpt.path
        assert ckpt.data_files == [directory.resolve() / "model.safetensors"]
        assert ckpt.config == {"model_type": "toy", "torch_dtype": "float32"}
        assert not ckpt.has("missing")
        with pytest.raises(CheckpointError, match="no tensor named 'missing'"):
            ckpt.tensor("missing")


def test_bare_file(model_dir, same_bytes):
    directory, tensors = model_dir
    ckpt = Checkpoint(directory / "model.safetensors")
    _check_contents(ckpt, tensors, same_bytes)
    assert ckpt.directory is None and ckpt.config is None


def test_sharded_names_follow_shard_then_offset_order(tmp_path, write_sharded, same_bytes):
    shards = {
        "model-00001-of-00002.safetensors": {"z.weight": torch.ones(2), "a.weight": torch.ones(3)},
        "model-00002-of-00002.safetensors": {
            "b.weight": torch.zeros(4),
            "y.weight": torch.zeros(1),
        },
    }
    write_sharded(tmp_path / "m", shards)
    ckpt = Checkpoint(tmp_path / "m")
    assert len(ckpt.data_files) == 2
    first = list(shards["model-00001-of-00002.safetensors"])
    assert sorted(ckpt.names[:2]) == sorted(first) and sorted(ckpt.names[2:]) == [
        "b.weight",
        "y.weight",
    ]
    assert ckpt.info(ckpt.names[0]).begin < ckpt.info(ckpt.names[1]).begin
    _check_contents(ckpt, {k: v for s in shards.values() for k, v in s.items()}, same_bytes)


def test_symlinked_shards_like_the_hf_cache(tmp_path, write_sharded, same_bytes):
    blobs = tmp_path / "blobs"
    write_sharded(
        blobs, {"a.safetensors": {"w": torch.arange(4.0)}, "b.safetensors": {"v": torch.ones(2)}}
    )
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("a.safetensors", "b.safetensors", "model.safetensors.index.json"):
        (snapshot / name).symlink_to(blobs / name)
    ckpt = Checkpoint(snapshot)
    _check_contents(ckpt, {"w": torch.arange(4.0), "v": torch.ones(2)}, same_bytes)


@pytest.mark.parametrize(
    "bad_name",
    ["../x.safetensors", "/tmp/x.safetensors", "sub/../../x.safetensors", "C:\\x.safetensors", ""],
)
def test_index_cannot_name_files_outside_the_directory(tmp_path, write_sharded, bad_name):
    (tmp_path / "x.safetensors").write_bytes(b"")  # the escape target exists
    write_sharded(
        tmp_path / "m", {"a.safetensors": {"w": torch.ones(1)}}, weight_map={"w": bad_name}
    )
    with pytest.raises(CheckpointError, match="shard name") as err:
        Checkpoint(tmp_path / "m")
    assert "model.safetensors.index.json" in str(err.value)


def test_index_may_use_a_subdirectory(tmp_path, write_sharded):
    write_sharded(tmp_path / "m", {"sub/a.safetensors": {"w": torch.ones(1)}})
    assert Checkpoint(tmp_path / "m").names == ["w"]


@pytest.mark.parametrize(
    "index_text",
    ["{not json", "[]", '{"metadata": {}}', '{"weight_map": {"w": 3}}', '{"weight_map": []}'],
)
def test_malformed_index(tmp_path, index_text):
    directory = tmp_path / "m"
    directory.mkdir()
    save_file({"w": torch.ones(1)}, directory / "a.safetensors")
    (directory / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(CheckpointError, match="index"):
        Checkpoint(directory)


def test_index_names_a_missing_file(tmp_path, write_sharded):
    write_sharded(
        tmp_path / "m",
        {"a.safetensors": {"w": torch.ones(1)}},
        weight_map={"w": "a.safetensors", "v": "b.safetensors"},
    )
    with pytest.raises(CheckpointError, match="names b.safetensors, which does not exist"):
        Checkpoint(tmp_path / "m")


def test_index_lists_a_tensor_its_shard_lacks(tmp_path, write_sharded):
    shards = {"a.safetensors": {"w": torch.ones(1)}, "b.safetensors": {"v": torch.ones(1)}}
    write_sharded(
        tmp_path / "m",
        shards,
        weight_map={"w": "a.safetensors", "v": "a.safetensors", "u": "b.safetensors"},
    )
    with pytest.raises(
        CheckpointError, match="tensor 'v' is listed in a.safetensors but is not in that file"
    ):
        Checkpoint(tmp_path / "m")


def test_tensor_in_two_shards(tmp_path, write_sharded):
    shards = {"a.safetensors": {"w": torch.ones(1)}, "b.safetensors": {"w": torch.zeros(1)}}
    write_sharded(tmp_path / "m", shards, weight_map={"w": "a.safetensors", "x": "b.safetensors"})
    with pytest.raises(
        CheckpointError, match="'w' is present in both a.safetensors and b.safetensors"
    ):
        Checkpoint(tmp_path / "m")


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such model"):
        Checkpoint(tmp_path / "nope")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model weights found"):
        Checkpoint(tmp_path)


def test_bare_file_of_unknown_kind(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a model directory"):
        Checkpoint(tmp_path / "weights.npz")


def test_malformed_config_json(model_dir):
    directory, _ = model_dir
    (directory / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(directory)


# -- pickled .bin checkpoints --


@pytest.fixture
def pickle_dir(tmp_path):
    directory = tmp_path / "bin_model"
    directory.mkdir()
    tensors = {"w": torch.randn(3, 2), "b": torch.randn(2).bfloat16()}
    torch.save(tensors, directory / "pytorch_model.bin")
    return directory, tensors


def test_pickle_refused_without_opt_in(pickle_dir):
    directory, _ = pickle_dir
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint(directory)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint(directory / "pytorch_model.bin")


def test_pickle_loaded_with_opt_in(pickle_dir, same_bytes):
    directory, tensors = pickle_dir
    _check_contents(Checkpoint(directory, allow_pickle=True), tensors, same_bytes)
    _check_contents(
        Checkpoint(directory / "pytorch_model.bin", allow_pickle=True), tensors, same_bytes
    )


def test_safetensors_preferred_over_pickle(pickle_dir):
    directory, _ = pickle_dir
    save_file({"only_here": torch.ones(1)}, directory / "model.safetensors")
    assert Checkpoint(directory).names == ["only_here"]


def test_sharded_pickle(tmp_path, same_bytes):
    directory = tmp_path / "m"
    directory.mkdir()
    shards = {
        "pytorch_model-00001-of-00002.bin": {"a": torch.ones(2)},
        "pytorch_model-00002-of-00002.bin": {"b": torch.zeros(3)},
    }
    for name, tensors in shards.items():
        torch.save(tensors, directory / name)
    weight_map = {k: name for name, tensors in shards.items() for k in tensors}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = Checkpoint(directory, allow_pickle=True)
    assert ckpt.names == ["a", "b"]
    _check_contents(ckpt, {"a": torch.ones(2), "b": torch.zeros(3)}, same_bytes)


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="flat dict"):
        Checkpoint(tmp_path, allow_pickle=True)


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    torch.save(
        {"w": torch.ones(1), "opt": object.__new__(_NotATensor)}, tmp_path / "pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match="weights-only"):
        Checkpoint(tmp_path, allow_pickle=True)


def test_a_pickle_in_torchs_legacy_format_is_read_whole(tmp_path, same_bytes):
    """torch.save before torch 1.6 (or with _use_new_zipfile_serialization=False) wrote a bare
    pickle stream, which cannot be memory-mapped: such a file is read into memory instead of
    refused, and its arbitrary objects are still refused."""
    tensors = {"w": torch.randn(3, 2), "b": torch.randn(2).bfloat16()}
    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _check_contents(Checkpoint(tmp_path, allow_pickle=True), tensors, same_bytes)
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    torch.save({"w": torch.ones(1), "opt": object.__new__(_NotATensor)}, hostile / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="weights-only"):
        Checkpoint(hostile, allow_pickle=True)


class _NotATensor:
    pass
