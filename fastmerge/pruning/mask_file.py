"""`masks.safetensors`: a set of keep-masks as packed bitmasks, tied to a model architecture.

Format (a plain safetensors file, readable by any safetensors library):
- one tensor per masked weight, named exactly as the weight in the checkpoint, dtype U8, shape
  [ceil(numel / 8)]: the packed bitmask of `fastmerge.ops.pack_mask` (element i of the weight's
  row-major flat index is bit i % 8 of byte i // 8, least significant bit first; 1 = keep;
  padding bits of the last byte are 0);
- metadata (string -> string):
  `format`: "fastmerge-mask", `format_version`: "1",
  `shapes`: JSON object {tensor name: [dims...]} (the weight's shape, needed to unpack),
  `architecture`: sha256 hex of the model's sorted (tensor name, shape) list, so a mask made for
  one model is refused by a model of another architecture (fine-tunes of the same base share it,
  which is what lets a mask travel into merges),
  plus free-form provenance: `model`, `score`, `sparsity`, `structure`.

Bit-exact round trip: save(load(x)) == x byte for byte, since bits are stored as given.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..io.writer import ShardedWriter
from ..ops import pack_mask, unpack_mask
from ..ops.mask import packed_size

FORMAT = "fastmerge-mask"
FORMAT_VERSION = "1"
FILE_NAME = "masks.safetensors"


def architecture_fingerprint(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """sha256 of the sorted (name, shape) list: equal for a model and its fine-tunes."""
    text = json.dumps(sorted((name, list(shape)) for name, shape in shapes))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class MaskSet:
    """Packed keep-masks by tensor name, with the shapes and architecture they belong to."""

    packed: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    architecture: str
    info: dict[str, str] = field(default_factory=dict)
    source: str = "in-memory masks"

    @classmethod
    def from_dense(cls, masks: dict[str, torch.Tensor], architecture: str, info: dict[str, str] | None = None) -> MaskSet:
        packed = {name: pack_mask(m.cpu()) for name, m in masks.items()}
        return cls(packed, {n: tuple(m.shape) for n, m in masks.items()}, architecture, dict(info or {}))

    def dense(self, name: str) -> torch.Tensor:
        """The bool keep-mask of tensor `name`."""
        return unpack_mask(self.packed[name], self.shapes[name])

    def kept(self, name: str) -> int:
        return int(self.dense(name).sum())

    def check_tensor(self, name: str, shape: Iterable[int]) -> None:
        """Refuse to apply the mask of `name` to a tensor of a different shape."""
        shape = tuple(shape)
        if self.shapes[name] != shape:
            raise CheckpointError(
                f"{self.source}: the mask for {name} has shape {list(self.shapes[name])} but the tensor has "
                f"shape {list(shape)}; this mask file was made for another model"
            )

    def check_model(self, shapes: dict[str, tuple[int, ...]], where: str) -> None:
        """Refuse a mask file made for a model of another architecture than `shapes`.

        A tensor the model lacks is refused even when the fingerprint matches: the fingerprint is
        only metadata, and an edited or hand-made file can carry a matching one."""
        missing = [n for n in self.shapes if n not in shapes]
        detail = f" (it masks {missing[0]}, which {where} does not have)" if missing else ""
        if missing or architecture_fingerprint(shapes.items()) != self.architecture:
            raise CheckpointError(
                f"{self.source} was made for a model of another architecture than {where}{detail}; "
                "masks only apply to the model they were computed on or its fine-tunes"
            )
        for name in self.shapes:
            self.check_tensor(name, shapes[name])

    def save(self, path: Path) -> None:
        """Write the file with fastmerge's own writer: its header (tensor and metadata order) is
        deterministic, so equal masks give byte-identical files (safetensors' Rust writer orders
        metadata by a per-process hash)."""
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
            "architecture": self.architecture,
            **dict(sorted(self.info.items())),
        }
        path = Path(path)
        staging = Path(tempfile.mkdtemp(prefix=".masks-", dir=path.parent))
        try:
            specs = [(n, torch.uint8, tuple(t.shape)) for n, t in self.packed.items()]
            total = sum(t.numel() for t in self.packed.values())
            with ShardedWriter(staging, specs, max(total, 1), metadata=metadata) as writer:
                for name, tensor in self.packed.items():
                    writer.write(name, tensor)
                writer.finalize()
            os.replace(staging / writer.shard_names[0], path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def load_masks(path: str | Path) -> MaskSet:
    """Read and validate a masks.safetensors file (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise CheckpointError(f"mask file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            packed = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastmerge mask file (metadata `format` is {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: mask format version {metadata.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    try:
        shapes = {n: tuple(int(d) for d in s) for n, s in json.loads(metadata["shapes"]).items()}
    except (KeyError, ValueError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: metadata `shapes` is missing or malformed") from None
    if set(shapes) != set(packed):
        raise CheckpointError(f"{path}: metadata `shapes` does not list exactly the masks in the file")
    for name, tensor in packed.items():
        numel = 1
        for d in shapes[name]:
            numel *= d
        if tensor.dtype != torch.uint8 or tensor.dim() != 1 or tensor.numel() != packed_size(numel):
            raise CheckpointError(
                f"{path}: mask {name} is {tensor.dtype} {list(tensor.shape)}; a packed mask of shape "
                f"{list(shapes[name])} must be uint8 [{packed_size(numel)}]"
            )
    info = {k: v for k, v in metadata.items() if k not in ("format", "format_version", "shapes", "architecture")}
    return MaskSet(packed, shapes, metadata.get("architecture", ""), info, source=str(path))
