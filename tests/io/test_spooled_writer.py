"""SpooledSafetensorsWriter: files safetensors loads, aligned, the spool gone, nothing left on failure."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file

from fastmerge.errors import OutputError
from fastmerge.io import spooled_writer
from fastmerge.io.safetensors_file import SafetensorsFile
from fastmerge.io.spooled_writer import SpooledSafetensorsWriter


def _write(path, tensors):
    with SpooledSafetensorsWriter(path) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.finish({"note": "x"})


def _header(path):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return 8 + length, json.loads(f.read(length))


def test_a_round_trip_in_every_dtype(tmp_path, sample_tensors, same_bytes):
    tensors = sample_tensors()
    # a strided view and a narrow tensor after a wide one, so the layout has to reorder them
    tensors["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    tensors["odd_bf16"] = torch.randn(3, 5).bfloat16()
    path = tmp_path / "adapter.safetensors"
    size = _write(path, tensors)
    assert size == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # the spool is gone
    loaded = load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert same_bytes(loaded[name], tensor.contiguous()), name
    data_start, header = _header(path)
    assert header["__metadata__"] == {"format": "pt", "note": "x"}
    ends = sorted(entry["data_offsets"] for key, entry in header.items() if key != "__metadata__")
    assert ends[0][0] == 0 and ends[-1][1] == size - data_start  # no hole, no tail
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    for name, tensor in tensors.items():  # every tensor aligned to its element size
        assert (data_start + header[name]["data_offsets"][0]) % tensor.element_size() == 0, name
    with SafetensorsFile(path) as reader:  # fastmerge's own reader maps them without a copy
        assert same_bytes(reader.tensor("odd_bf16"), tensors["odd_bf16"])


def test_nothing_is_left_without_finish(tmp_path):
    path = tmp_path / "adapter.safetensors"
    with SpooledSafetensorsWriter(path) as writer:
        writer.add("a", torch.ones(4))
        assert (tmp_path / f"adapter.safetensors{spooled_writer.SPOOL_SUFFIX}").exists()
    assert list(tmp_path.iterdir()) == []


def test_misuse_is_an_error_naming_the_tensor(tmp_path):
    with SpooledSafetensorsWriter(tmp_path / "a.safetensors") as writer:
        writer.add("twice", torch.ones(2))
        with pytest.raises(OutputError, match="'twice' added twice"):
            writer.add("twice", torch.ones(2))
        with pytest.raises(OutputError, match="'complex'.*cannot be stored"):
            writer.add("complex", torch.ones(2, dtype=torch.complex64))
    with pytest.raises(OutputError, match="cannot create"):
        SpooledSafetensorsWriter(tmp_path / "missing" / "a.safetensors")


@pytest.mark.parametrize("kernel", ["short copies", "unsupported", "absent"])
def test_the_copy_falls_back_to_reads_and_writes(tmp_path, monkeypatch, kernel, same_bytes):
    """copy_file_range may copy less than asked, be refused by a filesystem, or not exist."""
    real = getattr(os, "copy_file_range", None)
    if kernel == "short copies":
        if real is None:
            pytest.skip("no copy_file_range here")
        monkeypatch.setattr(os, "copy_file_range", lambda src, dst, count, offset: real(src, dst, min(count, 7), offset))
    elif kernel == "unsupported":
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    else:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(spooled_writer, "COPY_CHUNK", 10)
    tensors = {"a": torch.randn(5, 3), "b": torch.randn(7).half(), "c": torch.arange(9, dtype=torch.int64)}
    _write(tmp_path / "f.safetensors", tensors)
    loaded = load_file(tmp_path / "f.safetensors")
    assert all(same_bytes(loaded[n], t) for n, t in tensors.items())


def test_a_failed_copy_is_an_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "copy_file_range", fail, raising=False)
    with SpooledSafetensorsWriter(tmp_path / "f.safetensors") as writer:
        writer.add("a", torch.ones(3))
        with pytest.raises(OutputError, match="f.safetensors: writing the file failed .No space left"):
            writer.finish()
    assert list(tmp_path.iterdir()) == []
