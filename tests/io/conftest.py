"""Fixtures that build tiny checkpoints and hand-crafted (possibly corrupt) safetensors files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def _raw_file(
    path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None
) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + body + data)
    return path


@pytest.fixture
def raw_file(tmp_path):
    """raw_file(header, data=b"", header_len=None) -> path of a crafted safetensors file."""
    return lambda header, data=b"", header_len=None: _raw_file(
        tmp_path / "crafted.safetensors", header, data, header_len
    )


def _sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state dict in the dtypes merges read, including 0-d and empty tensors."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g).bfloat16(),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g).half(),
        "layers.0.norm.weight": torch.randn(8, generator=g),
        "layers.1.attn.weight": torch.randn(8, 8, generator=g).to(torch.float8_e4m3fn),
        "layers.1.mlp.weight": torch.randn(4, 8, generator=g).to(torch.float8_e5m2),
        "scale": torch.tensor(0.5),
        "empty": torch.zeros(0, 4),
    }


@pytest.fixture
def model_dir(tmp_path):
    """A single-file model directory with config.json; returns (path, tensors)."""
    directory = tmp_path / "model"
    directory.mkdir()
    tensors = _sample_tensors()
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(
        json.dumps({"model_type": "toy", "torch_dtype": "float32"})
    )
    return directory, tensors


def _write_sharded(
    directory: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict | None = None
) -> None:
    """Write the given shards plus an HF index (weight_map derived from the shards by default)."""
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, tensors in shards.items():
        (directory / file_name).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, directory / file_name)
    if weight_map is None:
        weight_map = {name: file_name for file_name, tensors in shards.items() for name in tensors}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, for dtypes (fp8) where torch.equal is not implemented."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


# Helpers as fixtures: conftest modules are not importable by name when test folders are not
# packages (and this folder cannot be a package named `io` without shadowing the stdlib).
@pytest.fixture
def sample_tensors():
    return _sample_tensors


@pytest.fixture
def write_sharded():
    return _write_sharded


@pytest.fixture
def same_bytes():
    return _same_bytes
