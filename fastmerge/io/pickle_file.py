"""Pickled PyTorch weight files (`pytorch_model*.bin`, or a bare `.bin`, `.pt` or `.pth` file), read
only when the user opts in.

Unpickling can run arbitrary code, so Checkpoint refuses these unless allow_pickle=True, and even
then we load with `weights_only=True` (tensors and plain containers only). `mmap=True` keeps the
storages on disk so memory stays bounded as with safetensors; a file in torch's legacy format
(before torch 1.6, or saved with `_use_new_zipfile_serialization=False`) cannot be mapped, so it
is read whole into memory. The class mirrors SafetensorsFile's surface so Checkpoint can treat
both file kinds alike.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from .safetensors_file import TensorInfo


class PickleFile:
    """A state dict from one pickled file; tensor offsets are unknown, so begin == end == -1."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            mappable = zipfile.is_zipfile(self.path)  # the zip format; the legacy one is a bare pickle stream
            state = torch.load(self.path, weights_only=True, mmap=mappable, map_location="cpu")
        except (OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as exc:
            raise CheckpointError(
                f"{self.path}: cannot load as a weights-only PyTorch file ({exc})"
            ) from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError(f"{self.path}: expected a flat dict of tensor name -> tensor")
        self._tensors: dict[str, torch.Tensor] = state
        self.metadata: dict[str, str] = {}
        self.infos: dict[str, TensorInfo] = {
            name: TensorInfo(name, t.dtype, tuple(t.shape), self.path, -1, -1)
            for name, t in state.items()
        }

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def release(self, name: str) -> None:
        """No-op: torch owns the mapping of pickled storages, so we cannot advise on it."""

    def prefetch(self, name: str) -> None:
        """No-op, for the same reason as release."""

    def close(self) -> None:
        self._tensors = {}
