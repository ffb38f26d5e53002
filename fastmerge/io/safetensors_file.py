"""Our own safetensors reader: validated header, one lazy mmap, zero-copy tensor views.

Why not the `safetensors` package: we need (a) strict validation with messages that name the
file and the tensor, (b) views that stay on the mmap so peak RSS is bounded by the tensors in
flight, and (c) `madvise` control to drop a tensor's pages after it has been merged. The format
is small: an 8-byte little-endian header length, a JSON header, then the data section.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS_TO_TORCH
from ..errors import CheckpointError
from ..values import is_integer
from . import mapping_guard

# A real header is a few MB at most (tens of thousands of tensors); anything larger is corrupt
# or hostile, and we refuse before reading it into memory.
MAX_HEADER_BYTES = 100 * 1000 * 1000

_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. begin/end are absolute byte offsets in `path`.

    For tensors from pickled `.bin` files, which have no fixed byte span, begin == end == -1.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# sendfile's errors that mean "this platform or filesystem cannot send a file to /dev/null"
# rather than a failed read.
_SENDFILE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP, errno.EBADF}


def _read_into_page_cache(path: Path, begin: int, end: int) -> int | None:
    """Read bytes [begin, end) of `path` into the page cache by sending them to /dev/null and
    return how many were read (fewer only at the end of the file); None when sendfile cannot
    do that here. A failed read raises OSError."""
    if not hasattr(os, "sendfile"):
        return None
    source = os.open(path, os.O_RDONLY)
    try:
        sink = os.open(os.devnull, os.O_WRONLY)
        offset = begin
        try:
            while offset < end:
                sent = os.sendfile(sink, source, offset, end - offset)
                if sent == 0:
                    break
                offset += sent
        except OSError as exc:
            if exc.errno in _SENDFILE_UNSUPPORTED and offset == begin:
                return None
            raise
        finally:
            os.close(sink)
    finally:
        os.close(source)
    return offset - begin


def _read_header(path: Path, file_size: int) -> tuple[dict, int]:
    """Read and JSON-decode the header; return it with the data section's start offset."""
    if file_size < 8:
        raise CheckpointError(f"{path}: {file_size} bytes is too short for a safetensors file")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte bound; "
                "the file is corrupt or not safetensors"
            )
        if header_len > file_size - 8:
            raise CheckpointError(
                f"{path}: header length {header_len} is larger than the file ({file_size} bytes); "
                "the file is truncated or not safetensors"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    return header, 8 + header_len


def _parse_metadata(path: Path, value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CheckpointError(f"{path}: `__metadata__` must map strings to strings")
    return dict(value)


def _parse_entry(
    path: Path, name: str, entry: object, data_start: int, data_size: int
) -> TensorInfo:
    """Validate one header entry against the data section; every error names the tensor."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise CheckpointError(
            f"{where}: entry must have exactly the keys dtype, shape, data_offsets"
        )
    dtype = SAFETENSORS_TO_TORCH.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: unknown dtype {entry['dtype']!r}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(is_integer(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} must be a list of non-negative integers")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_integer(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} lie outside the data section (0..{data_size})"
        )
    info = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)
    if info.nbytes != end - begin:
        raise CheckpointError(
            f"{where}: shape {shape} x {entry['dtype']} needs {info.nbytes} bytes "
            f"but data_offsets span {end - begin}"
        )
    return info


def _check_no_overlap(path: Path, infos: list[TensorInfo]) -> None:
    """infos sorted by (begin, end): each non-empty span must start at or after the previous end."""
    previous: TensorInfo | None = None
    for info in infos:
        if info.begin == info.end:
            continue
        if previous is not None and info.begin < previous.end:
            raise CheckpointError(
                f"{path}: tensors {previous.name!r} and {info.name!r} have overlapping data"
            )
        previous = info


class SafetensorsFile:
    """One .safetensors file: header parsed and validated on construction, data mapped lazily.

    Tensors returned by `tensor` are views over a read-only mapping: callers must not write to
    them (the pages are PROT_READ; a write would fault). Copy first if you need to mutate.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            file_size = os.stat(self.path).st_size
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read ({exc.strerror})") from None
        self._file_size = file_size
        header, data_start = _read_header(self.path, file_size)
        data_size = file_size - data_start
        self.metadata: dict[str, str] = {}
        parsed: list[TensorInfo] = []
        for name, entry in header.items():
            if name == "__metadata__":
                self.metadata = _parse_metadata(self.path, entry)
            else:
                parsed.append(_parse_entry(self.path, name, entry, data_start, data_size))
        parsed.sort(key=lambda i: (i.begin, i.end))
        _check_no_overlap(self.path, parsed)
        self.infos: dict[str, TensorInfo] = {info.name: info for info in parsed}
        self._mmap: mmap.mmap | None = None

    def _mapping(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            mapping_guard.guard(self._mmap, self.path, self._file_size)
        return self._mmap

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of the tensor (a copy only when its offset is misaligned)."""
        info = self.info(name)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():
            # The mapping is read-only by design; torch warns that it cannot enforce that.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            raw = torch.frombuffer(
                self._mapping(), dtype=torch.uint8, count=info.nbytes, offset=info.begin
            )
        if info.begin % info.dtype.itemsize:
            # Viewing misaligned bytes as a wider dtype is undefined for vectorised kernels.
            raw = raw.clone()
        return raw.view(info.dtype).reshape(info.shape)

    def _advise(self, name: str, advice: int) -> None:
        info = self.info(name)
        if info.numel == 0 or self._mmap is None:
            return
        # madvise wants a page-aligned start; rounding outwards only touches neighbours'
        # pages, which a read-only file mapping simply re-reads on their next access.
        start = info.begin - info.begin % _PAGE
        self._mmap.madvise(advice, start, info.end - start)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache).

        Without this, every page ever touched stays resident and RSS grows to the file size.
        """
        if hasattr(mmap, "MADV_DONTNEED"):
            self._advise(name, mmap.MADV_DONTNEED)

    def prefetch(self, name: str) -> None:
        """Bring the tensor's bytes into the page cache before anything touches them; returns
        once they are there (or the kernel has been asked to read them, see below).

        The engine's reader thread calls this a tensor ahead of the merge, so the disk is read
        here, in one sequential pass over each tensor, and the merge's page faults find cached
        pages instead of each waiting for a read of its own (the 7B ties merge from a cold
        cache: 1.5-1.7x faster, docs/performance.md). The bytes go to /dev/null through
        `sendfile`: no copy into this process and nothing mapped, so memory stays bounded; on
        cached pages it costs about 0.2 s of CPU per 9 GB. Where sendfile cannot do that (not
        Linux, or a filesystem without splice) an `MADV_WILLNEED` hint stands in, which Linux
        caps at the device's readahead size.
        """
        info = self.info(name)
        if info.numel == 0:
            return
        try:
            read = _read_into_page_cache(self.path, info.begin, info.end)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({exc.strerror})") from None
        if read is not None and read < info.nbytes:
            raise CheckpointError(f"{self.path}: the file ends inside tensor {name!r}; did it change during the merge?")
        if read is None and hasattr(mmap, "MADV_WILLNEED"):
            self._mapping()
            self._advise(name, mmap.MADV_WILLNEED)

    def close(self) -> None:
        """Drop our handle on the mapping; it is unmapped once no tensor view refers to it.

        We never call mmap.close(): torch.frombuffer keeps a reference to the mmap object but
        not a buffer export, so an explicit close would unmap pages that live views still
        point at (a segfault on the next read).
        """
        self._mmap = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.infos)} tensors)"
