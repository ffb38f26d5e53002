"""Turn an input file cut short while it is merged into an error naming it, not a crash.

Inputs are read through memory mappings. When a mapped file shrinks under a running merge (a
copy or a download over it), touching a page past its new end raises SIGBUS, which ended the
process without a word and left gigabytes of staged output behind. The native kernels' SIGBUS
handler (csrc/mapping_guard.h) maps zeros over such a page of a guarded mapping, so the merge
runs on, and records it; `check_intact` then raises before anything is written from those zeros
and before the output can be committed. Without the native kernels, or off Linux, nothing is
guarded and such a fault still ends the process.
"""

from __future__ import annotations

import mmap
import os
import weakref
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

# The files whose mappings are guarded, by slot: (path, size when it was opened).
_guarded: dict[int, tuple[Path, int]] = {}


def _native():
    try:
        from .. import _native
    except ImportError:
        return None
    return _native


def guard(mapping: mmap.mmap, path: Path, size: int) -> None:
    """Guard `mapping` of `path` (`size` bytes when opened) until it is unmapped."""
    native = _native()
    if native is None or len(mapping) == 0:
        return
    address = np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data
    slot = native.guard_mapping(address, len(mapping))
    if slot < 0:
        return
    _guarded[slot] = (path, size)
    weakref.finalize(mapping, _unguard, native, slot)


def _unguard(native, slot: int) -> None:
    _guarded.pop(slot, None)
    native.unguard_mapping(slot)


def pages_cut_short() -> int:
    """A count that grows whenever a page past the end of a guarded file is touched: compare
    it with an earlier reading to learn whether any input was cut short in between."""
    native = _native()
    return native.cut_short_pages() if native is not None else 0


def check_intact(since: int) -> None:
    """Raise naming the files that were cut short while mapped, if any page of one has been
    touched since `pages_cut_short()` returned `since`."""
    if pages_cut_short() == since:
        return
    native = _native()
    cut = [(path, size) for slot, (path, size) in list(_guarded.items()) if native.mapping_cut_short(slot)]
    names = "; ".join(f"{path} (was {size} bytes, now {_size_now(path)})" for path, size in cut) or "an input file"
    raise CheckpointError(f"{names}: cut short while it was being read (copied or downloaded over during the merge?); "
                          "the output, which would hold zeros for the lost bytes, was not written")


def _size_now(path: Path) -> str:
    try:
        return f"{os.stat(path).st_size} bytes"
    except OSError as exc:
        return exc.strerror or "gone"
