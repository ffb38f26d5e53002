"""Streaming sharded safetensors writer.

The whole layout (which shard, which byte offsets) is known before the first tensor is merged,
so every shard's header is written up front, the file is pre-sized, and each tensor is written
into its place as soon as it is ready, in any order (`shard_file.ShardFile`: direct IO where the
filesystem allows it). No shard is ever held in memory, which is what keeps a merge's peak RSS
independent of the model size.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from ..dtypes import TORCH_TO_SAFETENSORS
from ..errors import OutputError
from .shard_file import ShardFile, staging_buffer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class _Slot:
    """Where one output tensor goes."""

    shard: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the shard file
    nbytes: int


def _shard_name(index: int, count: int) -> str:
    return SINGLE_NAME if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _group_into_shards(sizes: Sequence[int], max_shard_bytes: int) -> list[list[int]]:
    """Greedy in the given order: start a new shard when the next tensor would overflow this one.

    A tensor larger than the limit gets a shard of its own (it cannot be split).
    """
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def header_bytes(entries: dict[str, dict], metadata: dict[str, str]) -> bytes:
    """8-byte length + JSON, padded with spaces so the data section starts 8-byte aligned."""
    body = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes without a copy (beyond making it contiguous on CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class ShardedWriter:
    """Writes a fixed set of tensors into model.safetensors or model-0000i-of-0000N.safetensors."""

    def __init__(
        self,
        directory: Path,
        tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ):
        self.directory = Path(directory)
        if max_shard_bytes <= 0:
            raise OutputError(f"max shard size must be positive, got {max_shard_bytes}")
        if metadata is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise OutputError("safetensors metadata must map strings to strings")
        self._metadata = {"format": "pt", **(metadata or {})}
        specs = self._check_specs(tensors)
        groups = _group_into_shards([nbytes for *_, nbytes in specs], max_shard_bytes)
        self.shard_names: list[str] = [_shard_name(i, len(groups)) for i in range(len(groups))]
        self.total_bytes: int = sum(nbytes for *_, nbytes in specs)
        self._slots: dict[str, _Slot] = {}
        self._shard_of: dict[str, str] = {}
        self._files: list[ShardFile] = []
        self._staging = staging_buffer()
        self._written: set[str] = set()
        self._finalized = False
        try:
            for shard, members in enumerate(groups):
                self._create_shard(shard, [specs[i] for i in members])
        except OSError as exc:
            self.close()
            raise OutputError(f"{self.directory}: cannot create output shards ({exc})") from None

    def _check_specs(self, tensors) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
        specs, seen = [], set()
        for name, dtype, shape in tensors:
            if name in seen:
                raise OutputError(f"output tensor {name!r} is listed twice")
            if dtype not in TORCH_TO_SAFETENSORS:
                raise OutputError(
                    f"output tensor {name!r}: dtype {dtype} cannot be stored in safetensors"
                )
            seen.add(name)
            shape = tuple(int(d) for d in shape)
            specs.append((name, dtype, shape, prod(shape) * dtype.itemsize))
        return specs

    def _create_shard(
        self, shard: int, specs: list[tuple[str, torch.dtype, tuple[int, ...], int]]
    ) -> None:
        # Widest dtypes first (stable) so every tensor starts aligned to its element size and
        # readers of this file get zero-copy views; safetensors itself lays files out this way.
        specs = sorted(specs, key=lambda spec: -spec[1].itemsize)
        entries, offset = {}, 0
        for name, dtype, shape, nbytes in specs:
            entries[name] = {
                "dtype": TORCH_TO_SAFETENSORS[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        header = header_bytes(entries, self._metadata)
        name = self.shard_names[shard]
        shard_file = ShardFile(self.directory / name, len(header) + offset, staging=self._staging)
        self._files.append(shard_file)
        shard_file.write(0, memoryview(header))
        for tensor_name, dtype, shape, nbytes in specs:
            begin = entries[tensor_name]["data_offsets"][0]
            self._slots[tensor_name] = _Slot(shard, dtype, shape, len(header) + begin, nbytes)
            self._shard_of[tensor_name] = name

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one output tensor into its slot; dtype and shape must match the layout."""
        if self._finalized or not self._files:
            raise OutputError(f"cannot write {name!r}: the output was already finalized or closed")
        slot = self._slots.get(name)
        if slot is None:
            raise OutputError(f"{name!r} is not one of the planned output tensors")
        if name in self._written:
            raise OutputError(f"output tensor {name!r} was written twice")
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise OutputError(
                f"output tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, "
                f"planned {slot.dtype} {slot.shape}"
            )
        if slot.nbytes:
            try:
                self._files[slot.shard].write(slot.offset, tensor_bytes(tensor))
            except OSError as exc:
                shard = self.directory / self.shard_names[slot.shard]
                raise OutputError(f"{shard}: writing {name!r} failed ({exc})") from None
        self._written.add(name)

    def finalize(self) -> None:
        """Check completeness, flush shards to disk and write the index for sharded output."""
        if self._finalized:
            raise OutputError(f"{self.directory}: output already finalized")
        if not self._files:
            raise OutputError(f"{self.directory}: cannot finalize a closed writer")
        missing = [name for name in self._slots if name not in self._written]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise OutputError(f"{self.directory}: output tensors never written: {shown}{more}")
        try:
            for shard_file in self._files:
                shard_file.finish()
            self.close()
            if len(self.shard_names) > 1:
                self._write_index()
        except OSError as exc:
            raise OutputError(f"{self.directory}: finishing the output failed ({exc})") from None
        self._finalized = True

    def _write_index(self) -> None:
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self._shard_of}
        path = self.directory / INDEX_NAME
        with open(path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Close the shard files (without finalizing); safe to call more than once."""
        while self._files:
            self._files.pop().close()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
