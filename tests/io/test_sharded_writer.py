"""ShardedWriter: greedy layout, byte-exact files that safetensors loads, misuse errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from fastmerge.errors import OutputError
from fastmerge.io.safetensors_file import SafetensorsFile
from fastmerge.io.writer import ShardedWriter


def _specs(tensors: dict[str, torch.Tensor]):
    return [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def _write_all(directory, tensors, max_shard_bytes, order=None, metadata=None) -> ShardedWriter:
    writer = ShardedWriter(directory, _specs(tensors), max_shard_bytes, metadata=metadata)
    for name in order or tensors:
        writer.write(name, tensors[name])
    writer.finalize()
    return writer


def test_single_shard_round_trips_through_safetensors(tmp_path, sample_tensors, same_bytes):
    tensors = sample_tensors()
    writer = _write_all(
        tmp_path, tensors, 10**9, order=reversed(list(tensors)), metadata={"by": "test"}
    )
    assert writer.shard_names == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert same_bytes(loaded[name], tensor), name
    assert SafetensorsFile(tmp_path / "model.safetensors").metadata == {
        "format": "pt",
        "by": "test",
    }
    assert writer.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_header_is_padded_to_eight_bytes(tmp_path):
    _write_all(tmp_path, {"w": torch.ones(3)}, 10**9)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert header_len % 8 == 0
    assert raw[8 : 8 + header_len].decode().endswith((" ", "}"))
    assert len(raw) == 8 + header_len + 12


def test_greedy_layout_and_index(tmp_path, same_bytes):
    # 40-byte tensors with a 100-byte limit: two fit per shard; the 400-byte one stands alone.
    tensors = {
        "a": torch.full((10,), 1.0),
        "b": torch.full((10,), 2.0),
        "c": torch.full((10,), 3.0),
        "big": torch.full((100,), 4.0),
        "d": torch.full((10,), 5.0),
    }
    writer = _write_all(tmp_path, tensors, 100)
    assert writer.shard_names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 4 * 40 + 400}
    assert index["weight_map"] == {
        "a": writer.shard_names[0],
        "b": writer.shard_names[0],
        "c": writer.shard_names[1],
        "big": writer.shard_names[2],
        "d": writer.shard_names[3],
    }
    for name, shard in index["weight_map"].items():
        assert same_bytes(load_file(tmp_path / shard)[name], tensors[name])


def test_mixed_dtypes_in_a_shard_stay_aligned(tmp_path):
    tensors = {
        "h": torch.ones(3, dtype=torch.float16),
        "f": torch.ones(3),
        "d": torch.ones(1, dtype=torch.float64),
    }
    _write_all(tmp_path, tensors, 10**9)
    f = SafetensorsFile(tmp_path / "model.safetensors")
    for info in f.infos.values():
        assert info.begin % info.dtype.itemsize == 0, info.name


def test_non_contiguous_and_readonly_inputs(tmp_path, model_dir, same_bytes):
    source = SafetensorsFile(model_dir[0] / "model.safetensors")
    mapped = source.tensor("embed.weight")  # a read-only mmap view
    tensors = {"t": torch.arange(12.0).reshape(3, 4).t(), "mapped": mapped}
    _write_all(tmp_path, tensors, 10**9)
    loaded = load_file(tmp_path / "model.safetensors")
    assert same_bytes(loaded["t"], tensors["t"].contiguous())
    assert same_bytes(loaded["mapped"], mapped)


def test_no_tensors_gives_an_empty_valid_file(tmp_path):
    writer = _write_all(tmp_path, {}, 100)
    assert writer.shard_names == ["model.safetensors"] and writer.total_bytes == 0
    assert load_file(tmp_path / "model.safetensors") == {}


@pytest.fixture
def writer(tmp_path):
    w = ShardedWriter(tmp_path, [("w", torch.bfloat16, (2, 3)), ("v", torch.float32, ())], 10**9)
    yield w
    w.close()


@pytest.mark.parametrize(
    "name, tensor, message",
    [
        ("w", torch.zeros(2, 3), "got torch.float32 .* planned torch.bfloat16"),
        ("w", torch.zeros(3, 2, dtype=torch.bfloat16), r"\(3, 2\), planned .* \(2, 3\)"),
        ("x", torch.zeros(1), "'x' is not one of the planned"),
    ],
)
def test_write_checks_name_dtype_shape(writer, name, tensor, message):
    with pytest.raises(OutputError, match=message):
        writer.write(name, tensor)


def test_write_twice_and_finalize_misuse(writer):
    writer.write("w", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(OutputError, match="written twice"):
        writer.write("w", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(OutputError, match="never written: 'v'"):
        writer.finalize()
    writer.write("v", torch.tensor(1.0))
    writer.finalize()
    with pytest.raises(OutputError, match="already finalized"):
        writer.finalize()
    with pytest.raises(OutputError, match="already finalized"):
        writer.write("v", torch.tensor(1.0))


def test_bad_construction(tmp_path):
    with pytest.raises(OutputError, match="listed twice"):
        ShardedWriter(tmp_path, [("w", torch.float32, (1,)), ("w", torch.float32, (1,))], 100)
    with pytest.raises(OutputError, match="cannot be stored"):
        ShardedWriter(tmp_path, [("w", torch.complex64, (1,))], 100)
    with pytest.raises(OutputError, match="must be positive"):
        ShardedWriter(tmp_path, [], 0)
    with pytest.raises(OutputError, match="strings to strings"):
        ShardedWriter(tmp_path, [], 100, metadata={"k": 1})


def test_existing_shard_file_is_not_overwritten(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(OutputError, match="cannot create output shards"):
        ShardedWriter(tmp_path, [("w", torch.float32, (1,))], 100)
    assert (tmp_path / "model.safetensors").read_bytes() == b"precious"
