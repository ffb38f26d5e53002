"""ShardFile: pieces written in any order, at any alignment, give exactly the planned bytes,
through direct IO, buffered writes, and a switch from one to the other mid-file."""

from __future__ import annotations

import errno
import fcntl
import os
import random

import pytest

from fastmerge.io import shard_file
from fastmerge.io.shard_file import BLOCK, ShardFile


def _pieces(seed: int) -> list[bytes]:
    """Byte strings of awkward lengths: empty, single bytes, ones that stay inside a block,
    straddle one boundary, or cover several whole blocks; the total is not block-aligned."""
    rng = random.Random(seed)
    lengths = [8, 0, 1, 3, BLOCK - 5, 2, BLOCK, 1, 3 * BLOCK + 17, 40, 2 * BLOCK - 1, 7, 5 * BLOCK + 3]
    lengths += [rng.randrange(1, 3 * BLOCK) for _ in range(20)]
    return [rng.randbytes(n) for n in lengths]


def _write_pieces(path, pieces: list[bytes], order: list[int], direct: bool) -> ShardFile:
    offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    f = ShardFile(path, sum(map(len, pieces)), direct=direct)
    try:
        for i in order:
            f.write(offsets[i], memoryview(pieces[i]))
        f.finish()
    finally:
        f.close()
    return f


def _direct_or_skip(f: ShardFile) -> None:
    if not f.direct:
        pytest.skip("this filesystem refuses O_DIRECT; the buffered path is tested separately")


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_order_gives_the_planned_bytes(tmp_path, direct, seed):
    pieces = _pieces(seed)
    order = list(range(len(pieces)))
    random.Random(seed + 100).shuffle(order)
    f = _write_pieces(tmp_path / "shard", pieces, order, direct)
    if direct:
        _direct_or_skip(f)
    else:
        assert not f.direct
    assert (tmp_path / "shard").read_bytes() == b"".join(pieces)


def test_writes_larger_than_a_shared_staging_buffer(tmp_path):
    staging = shard_file.staging_buffer(2 * BLOCK)
    expected = {}
    for name in ("a", "b"):
        pieces = [os.urandom(11), os.urandom(9 * BLOCK + 5), os.urandom(BLOCK - 16)]
        f = ShardFile(tmp_path / name, sum(map(len, pieces)), staging=staging)
        _direct_or_skip(f)
        f.write(11, memoryview(pieces[1]))
        f.write(11 + len(pieces[1]), memoryview(pieces[2]))
        f.write(0, memoryview(pieces[0]))
        f.finish()
        f.close()
        expected[name] = b"".join(pieces)
    for name, data in expected.items():
        assert (tmp_path / name).read_bytes() == data


def test_a_refused_direct_write_switches_to_buffered(tmp_path, monkeypatch):
    """A filesystem that takes O_DIRECT at open but fails the writes (EINVAL): the file goes
    buffered, partial blocks gathered so far included, and still gets every byte."""
    real_pwrite, direct_writes = os.pwrite, []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_writes.append(offset)
            if len(direct_writes) > 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(shard_file.os, "pwrite", pwrite)
    pieces = _pieces(3)
    f = _write_pieces(tmp_path / "shard", pieces, list(range(len(pieces))), direct=True)
    if not direct_writes:
        pytest.skip("this filesystem refuses O_DIRECT at open")
    assert not f.direct and len(direct_writes) == 3
    assert (tmp_path / "shard").read_bytes() == b"".join(pieces)


def test_missing_bytes_fail_finish(tmp_path):
    """A direct file knows which blocks are still partial (a buffered one cannot tell: there
    ShardedWriter's check that every tensor arrived is the guard)."""
    f = ShardFile(tmp_path / "shard", 3 * BLOCK)
    try:
        _direct_or_skip(f)
        f.write(0, memoryview(b"x" * (BLOCK + 10)))
        f.write(BLOCK + 20, memoryview(b"y" * (2 * BLOCK - 20)))
        with pytest.raises(OSError, match=f"bytes {BLOCK}..{2 * BLOCK} were never written"):
            f.finish()
    finally:
        f.close()


@pytest.mark.parametrize("direct", [True, False])
def test_writes_outside_the_file_are_refused(tmp_path, direct):
    f = ShardFile(tmp_path / "shard", 100, direct=direct)
    try:
        with pytest.raises(ValueError, match="bytes 90..110 lie outside the file's 100"):
            f.write(90, memoryview(b"z" * 20))
        with pytest.raises(ValueError, match="bytes -1..0"):
            f.write(-1, memoryview(b"z"))
    finally:
        f.close()


def test_an_existing_file_is_never_opened(tmp_path):
    (tmp_path / "shard").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        ShardFile(tmp_path / "shard", 10)
    assert (tmp_path / "shard").read_bytes() == b"precious"
