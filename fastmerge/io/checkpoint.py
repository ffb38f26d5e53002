"""A model checkpoint as the user names it: a Hugging Face style directory or a bare file.

Accepted forms, in the order a directory is probed:
  model.safetensors.index.json + shards   (sharded safetensors)
  model.safetensors                       (single file)
  pytorch_model.bin.index.json + shards   (pickle: only with allow_pickle=True)
  pytorch_model.bin                       (pickle: only with allow_pickle=True)
or a bare `.safetensors` file (or, with allow_pickle, a `.bin`, `.pt` or `.pth` one: torch.save's
usual names, as `fastmerge pytorch` merges arbitrary checkpoints).

Index files come from the internet, so every shard name is checked to be a plain relative name
inside the model directory before anything is opened. Symlinks are still followed, because the
Hugging Face cache links snapshot files to blobs stored elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ..errors import CheckpointError
from .hub import looks_like_repo_id, resolve_repo
from .pickle_file import PickleFile
from .safetensors_file import SafetensorsFile, TensorInfo

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

_PICKLE_HINT = (
    "it holds only pickled PyTorch weights, which can run code when loaded; "
    "pass --allow-pickle (allow_pickle=True) if you trust it"
)


def _member_path(directory: Path, name: object, index_path: Path) -> Path:
    """Join an index's shard name to the directory, refusing anything that could escape it."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{index_path}: shard name {name!r} is not a file name")
    as_written = [PurePosixPath(name), PureWindowsPath(name)]
    if any(p.is_absolute() or p.drive or p.root or ".." in p.parts for p in as_written):
        raise CheckpointError(
            f"{index_path}: shard name {name!r} must be a relative name inside {directory} "
            "(no absolute path, no '..')"
        )
    joined = Path(os.path.normpath(directory / name))
    if joined == directory or os.path.commonpath([joined, directory]) != str(directory):
        raise CheckpointError(f"{index_path}: shard name {name!r} resolves outside {directory}")
    return joined


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """The `weight_map` of an HF index file (tensor name -> shard file name), validated."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_path}: cannot read the index ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index_path}: expected a JSON object with a `weight_map` of tensor name -> file name"
        )
    return weight_map


def _read_config(directory: Path) -> dict | None:
    config_path = directory / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot read the model config ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: the model config must be a JSON object")
    return config


class Checkpoint:
    """All tensors of one model, opened lazily per file, addressed by tensor name."""

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path).expanduser().resolve()
        self.allow_pickle = allow_pickle
        if not self.path.exists():
            # Relative paths count from the working directory (as in mergekit), not the config's;
            # one that is none there but reads as `org/name` is a Hugging Face Hub repository.
            where = "" if Path(path).expanduser().is_absolute() else f" (looked for {self.path})"
            if not looks_like_repo_id(str(path)):
                raise CheckpointError(f"{path}: no such model directory or file{where}")
            self.path = resolve_repo(str(path), f"no such model directory or file{where}")
        if self.path.is_dir():
            self.directory: Path | None = self.path
            self.data_files, index = self._find_directory_files()
            self.config = _read_config(self.path)
        else:
            self.directory = None
            self.data_files, index = [self._check_bare_file()], None
            self.config = None
        self._files = [self._open(p) for p in self.data_files]
        self._owner: dict[str, SafetensorsFile | PickleFile] = {}
        for file in self._files:
            for name in file.infos:
                if name in self._owner:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is present in both "
                        f"{self._owner[name].path.name} and {file.path.name}"
                    )
                self._owner[name] = file
        if index is not None:
            self._check_index_agrees(*index)
        self.names: list[str] = list(self._owner)

    def _find_directory_files(self) -> tuple[list[Path], tuple[Path, dict[str, str]] | None]:
        """Data files (in shard order) and the index path + weight map they came from, if any."""
        for index_name, single_name, pickled in (
            (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, False),
            (PICKLE_INDEX, PICKLE_SINGLE, True),
        ):
            index_path, single_path = self.path / index_name, self.path / single_name
            if not (index_path.is_file() or single_path.is_file()):
                continue
            if pickled and not self.allow_pickle:
                raise CheckpointError(f"{self.path}: {_PICKLE_HINT}")
            if not index_path.is_file():
                return [single_path], None
            weight_map = _read_weight_map(index_path)
            # Shard names sort in shard order (model-00001-of-00003, ...); the weight map itself
            # is usually sorted by tensor name, which interleaves shards.
            shards = [
                _member_path(self.path, n, index_path) for n in sorted(set(weight_map.values()))
            ]
            for shard in shards:
                if not shard.is_file():
                    raise CheckpointError(f"{index_path}: names {shard.name}, which does not exist")
            return shards, (index_path, weight_map)
        raise CheckpointError(
            f"{self.path}: no model weights found (expected {SAFETENSORS_SINGLE}, "
            f"{SAFETENSORS_INDEX}, {PICKLE_SINGLE} or {PICKLE_INDEX})"
        )

    def _check_bare_file(self) -> Path:
        if self.path.suffix == ".safetensors":
            return self.path
        if self.path.suffix in PICKLE_SUFFIXES:
            if not self.allow_pickle:
                raise CheckpointError(f"{self.path}: {_PICKLE_HINT}")
            return self.path
        raise CheckpointError(f"{self.path}: not a model directory, .safetensors file or pickled "
                              f"{'/'.join(PICKLE_SUFFIXES)} file")

    @staticmethod
    def _open(path: Path) -> SafetensorsFile | PickleFile:
        return PickleFile(path) if path.suffix in PICKLE_SUFFIXES else SafetensorsFile(path)

    def _check_index_agrees(self, index_path: Path, weight_map: dict[str, str]) -> None:
        """Every tensor the index lists must be in the shard it names (and only there)."""
        for name, shard_name in weight_map.items():
            owner = self._owner.get(name)
            expected = _member_path(self.path, shard_name, index_path)
            if owner is None or owner.path != expected:
                raise CheckpointError(
                    f"{index_path}: tensor {name!r} is listed in {shard_name} "
                    "but is not in that file"
                )

    def _file_of(self, name: str) -> SafetensorsFile | PickleFile:
        try:
            return self._owner[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: model has no tensor named {name!r}") from None

    @property
    def sources(self) -> list[Path]:
        """Every path this checkpoint reads from (an output must not be placed inside one)."""
        return [self.path]

    @property
    def files(self) -> list[Path]:
        """Where each of its weight files really lies (--overwrite must not delete one): a shard
        may be a link into another directory, as in a Hugging Face cache's snapshots."""
        return sorted({f.path.resolve() for f in self._owner.values()})

    def required_config(self, why: str) -> dict:
        """config.json as a dict, or a CheckpointError saying it is missing and `why` it is needed."""
        if self.config is None:
            raise CheckpointError(f"{self.path}: no config.json; {why}")
        return self.config

    def has(self, name: str) -> bool:
        return name in self._owner

    def info(self, name: str) -> TensorInfo:
        return self._file_of(name).infos[name]

    def read_bytes(self, name: str) -> int:
        """Bytes read from disk to produce `name` (what `fastmerge plan` and the GB/s figures count)."""
        return self.info(name).nbytes

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy for safetensors; read-only by contract (see SafetensorsFile)."""
        return self._file_of(name).tensor(name)

    def release(self, name: str) -> None:
        self._file_of(name).release(name)

    def prefetch(self, name: str) -> None:
        self._file_of(name).prefetch(name)

    def close(self) -> None:
        for file in self._files:
            file.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        files = len(self.data_files)
        return f"Checkpoint({str(self.path)!r}, {len(self.names)} tensors in {files} files)"
