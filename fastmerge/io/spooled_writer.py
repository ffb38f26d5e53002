"""A safetensors file written tensor by tensor when the set of tensors is not known in advance.

`ShardedWriter` lays out every shard before the first tensor exists. LoRA extraction cannot:
each factor's rank comes out of its own SVD. Holding the finished adapter in memory until the
end would make memory grow with the model (two 128k-vocabulary embeddings saved whole are 2 GB
in bf16). Here each tensor's bytes are appended to a spool file beside the target as soon as it
is made, so memory holds one tensor at a time. `finish` writes the header, known by then, and
moves every tensor's bytes from the spool into place with copy_file_range (inside the kernel,
nothing copied through this process), widest dtype first as ShardedWriter lays files out so
every tensor starts aligned to its element size, and deletes the spool.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import TORCH_TO_SAFETENSORS
from ..errors import OutputError
from .writer import header_bytes, tensor_bytes

SPOOL_SUFFIX = ".spool"
# Bytes per read/write where copy_file_range is unavailable.
COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class _Spooled:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in the spool
    nbytes: int


class SpooledSafetensorsWriter:
    """Append tensors with `add`, then `finish` writes `path`; a failed `finish`, or `close`
    without one, leaves nothing behind."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._spool_path = self.path.with_name(self.path.name + SPOOL_SUFFIX)
        try:
            self._spool = open(self._spool_path, "w+b")
        except OSError as exc:
            raise OutputError(f"{self._spool_path}: cannot create ({exc.strerror or exc})") from None
        self._tensors: dict[str, _Spooled] = {}
        self._spooled_bytes = 0

    def __len__(self) -> int:
        return len(self._tensors)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor's bytes to the spool."""
        if name in self._tensors:
            raise OutputError(f"{self.path}: tensor {name!r} added twice")
        if tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise OutputError(f"{self.path}: tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        data = tensor_bytes(tensor)
        try:
            self._spool.write(data)
        except OSError as exc:
            raise OutputError(f"{self._spool_path}: writing {name!r} failed ({exc.strerror or exc})") from None
        self._tensors[name] = _Spooled(tensor.dtype, tuple(tensor.shape), self._spooled_bytes, data.nbytes)
        self._spooled_bytes += data.nbytes

    def finish(self, metadata: dict[str, str] | None = None) -> int:
        """Write the safetensors file (synced to disk), delete the spool; the file's size."""
        order = sorted(self._tensors, key=lambda name: -self._tensors[name].dtype.itemsize)  # stable
        entries, offset = {}, 0
        for name in order:
            spooled = self._tensors[name]
            entries[name] = {"dtype": TORCH_TO_SAFETENSORS[spooled.dtype], "shape": list(spooled.shape),
                             "data_offsets": [offset, offset + spooled.nbytes]}
            offset += spooled.nbytes
        header = header_bytes(entries, {"format": "pt", **(metadata or {})})
        try:
            self._spool.flush()
            with open(self.path, "wb") as out:
                out.write(header)
                out.flush()
                for name in order:
                    spooled = self._tensors[name]
                    _copy_range(self._spool.fileno(), out.fileno(), spooled.offset, spooled.nbytes)
                os.fsync(out.fileno())
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            raise OutputError(f"{self.path}: writing the file failed ({exc.strerror or exc})") from None
        finally:
            self.close()
        return len(header) + offset

    def close(self) -> None:
        """Close and delete the spool; safe to call more than once."""
        if not self._spool.closed:
            self._spool.close()
            self._spool_path.unlink(missing_ok=True)

    def __enter__(self) -> SpooledSafetensorsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _copy_range(source: int, target: int, offset: int, count: int) -> None:
    """Append `count` bytes of `source` from `offset` to `target` (at its file position)."""
    copy = getattr(os, "copy_file_range", None)
    while count > 0 and copy is not None:
        try:
            done = copy(source, target, count, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            break  # this filesystem pair cannot: fall back to plain reads and writes
        if done == 0:
            raise OSError(errno.EIO, f"the spool ended {count} bytes early")
        offset, count = offset + done, count - done
    while count > 0:
        chunk = os.pread(source, min(count, COPY_CHUNK), offset)
        if not chunk:
            raise OSError(errno.EIO, f"the spool ended {count} bytes early")
        view = memoryview(chunk)
        while view:
            view = view[os.write(target, view):]
        offset, count = offset + len(chunk), count - len(chunk)
