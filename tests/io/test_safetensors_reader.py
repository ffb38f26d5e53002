"""SafetensorsFile: header validation, zero-copy views, madvise-based release."""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge.errors import CheckpointError
from fastmerge.io.safetensors_file import MAX_HEADER_BYTES, SafetensorsFile

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def test_reads_every_dtype_bytewise_like_safetensors(tmp_path, sample_tensors, same_bytes):
    path = tmp_path / "m.safetensors"
    save_file(sample_tensors(), path, metadata={"note": "hi"})
    reference = load_file(path)
    with SafetensorsFile(path) as f:
        assert f.metadata == {"note": "hi"}
        assert set(f.infos) == set(reference)
        for name, expected in reference.items():
            assert same_bytes(f.tensor(name), expected), name
            assert f.infos[name].nbytes == expected.numel() * expected.element_size()


def test_infos_are_in_file_order(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(
        {"b": torch.zeros(3), "a": torch.zeros(2, dtype=torch.float64), "c": torch.zeros(1)}, path
    )
    f = SafetensorsFile(path)
    begins = [info.begin for info in f.infos.values()]
    assert begins == sorted(begins)
    assert list(f.infos)[0] == "a"  # safetensors puts the widest dtype first


def test_zero_d_and_empty_tensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"s": torch.tensor(2.5), "e": torch.zeros(0, 3, dtype=torch.bfloat16)}, path)
    f = SafetensorsFile(path)
    assert f.tensor("s").shape == () and f.tensor("s").item() == 2.5
    assert f.tensor("e").shape == (0, 3) and f.tensor("e").dtype == torch.bfloat16
    f.release("e")
    f.release("s")


def _file_mappings(path) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                start, end = line.split()[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_tensor_is_a_view_into_the_file_mapping(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64), "v": torch.randn(10)}, path)
    f = SafetensorsFile(path)
    assert _file_mappings(path) == []  # mapped lazily
    w, v = f.tensor("w"), f.tensor("v")
    ((start, end),) = _file_mappings(path)  # one mapping for the whole file
    for t in (w, v):
        assert start <= t.data_ptr() < t.data_ptr() + t.nbytes <= end
    assert v.data_ptr() - w.data_ptr() == f.infos["v"].begin - f.infos["w"].begin
    f.close()
    assert len(_file_mappings(path)) == 1  # live views keep the pages mapped after close
    del w, v, t
    assert _file_mappings(path) == []  # ... and the last one unmaps them


def test_misaligned_tensor_is_copied_and_correct(raw_file):
    header = {
        "byte": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "odd": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)  # data section 8-aligned, so only the tensor offset is odd
    path = raw_file(body, b"\x07" + struct.pack("<2f", 1.5, -2.0))
    f = SafetensorsFile(path)
    odd = f.tensor("odd")
    assert odd.tolist() == [1.5, -2.0]
    assert odd.data_ptr() % 4 == 0
    assert f.tensor("byte").tolist() == [7]


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def _touch_all(f: SafetensorsFile, release: bool) -> int:
    """Read every tensor; return how much file-backed RSS grew."""
    before = _rss_file_bytes()
    for name in f.infos:
        f.tensor(name).sum()
        if release:
            f.release(name)
    return _rss_file_bytes() - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_release_bounds_resident_memory(tmp_path):
    mib = 1 << 20
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.ones(mib) for i in range(8)}, path)  # 8 x 4 MiB
    with SafetensorsFile(path) as f:
        before = _rss_file_bytes()
        views = [f.tensor(name) for name in f.infos]
        assert _rss_file_bytes() - before < 4 * mib  # creating views reads nothing
        del views
        assert _touch_all(f, release=True) < 12 * mib
    with SafetensorsFile(path) as f:  # the same reads without release do keep the pages
        assert _touch_all(f, release=False) > 24 * mib


def test_prefetch_and_close_keep_views_valid(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6.0)}, path)
    f = SafetensorsFile(path)
    f.prefetch("w")
    w = f.tensor("w")
    f.close()
    assert w.tolist() == [0, 1, 2, 3, 4, 5]


def _cached(path, offset: int) -> bool:
    """Whether the page at `offset` of `path` is in the page cache (a read that may not wait)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], offset, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _drop_from_page_cache(path, probes) -> bool:
    """Write the file back and drop its pages from the cache; whether the probed offsets are
    out. A few tries: pages still in flight to the disk, or in a CPU's LRU batch, stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(20):
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not any(_cached(path, offset) for offset in probes):
                return True
            time.sleep(0.05)
        return False
    finally:
        os.close(fd)


@pytest.mark.skipif(not (hasattr(os, "RWF_NOWAIT") and hasattr(os, "posix_fadvise")), reason="Linux only")
def test_prefetch_reads_the_tensor_into_the_page_cache(tmp_path):
    path = tmp_path / "m.safetensors"
    mib = 1 << 20
    # b (32 MiB) is larger than Linux lets one readahead hint reach (read_ahead_kb, at most a
    # few MiB), so only a real read caches all of it.
    save_file({"a": torch.zeros(mib), "b": torch.ones(8 * mib), "c": torch.zeros(mib)}, path)
    f = SafetensorsFile(path)
    b = f.info("b")
    if not _drop_from_page_cache(path, [b.begin + 4 * mib, b.end - 4096]):
        pytest.skip("this filesystem keeps the pages cached after POSIX_FADV_DONTNEED")
    f.prefetch("b")
    assert all(_cached(path, offset) for offset in range(b.begin - b.begin % 4096, b.end, 64 * 1024))
    assert f.tensor("b").eq(1).all()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_prefetch_maps_nothing_into_the_process(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(8 << 20)}, path)  # 32 MiB
    with SafetensorsFile(path) as f:
        before = _rss_file_bytes()
        f.prefetch("w")
        assert _rss_file_bytes() - before < 4 << 20


def _sendfile_fails_with(monkeypatch, code: int) -> None:
    """Make every os.sendfile call fail with the error `code`."""

    def failing(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "sendfile", failing)


def test_prefetch_falls_back_to_a_hint_where_sendfile_cannot_read_a_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6.0)}, path)
    _sendfile_fails_with(monkeypatch, errno.EINVAL)
    hints = []
    monkeypatch.setattr(SafetensorsFile, "_advise", lambda self, name, advice: hints.append((name, advice)))
    f = SafetensorsFile(path)
    f.prefetch("w")
    assert hints == [("w", mmap.MADV_WILLNEED)]
    assert f.tensor("w").tolist() == [0, 1, 2, 3, 4, 5]


def test_prefetch_names_the_file_and_tensor_when_a_read_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6.0)}, path)
    _sendfile_fails_with(monkeypatch, errno.EIO)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: cannot read tensor 'w' \(Input/output error\)"):
        SafetensorsFile(path).prefetch("w")


def test_prefetch_of_a_file_cut_short_after_opening_is_an_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(1000), "w": torch.ones(1000)}, path)
    f = SafetensorsFile(path)
    os.truncate(path, f.info("w").begin + 100)
    with pytest.raises(CheckpointError, match="the file ends inside tensor 'w'"):
        f.prefetch("w")
    f.prefetch("a")  # the tensors before the cut are still whole


def test_prefetch_of_an_empty_tensor_reads_nothing(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_file({"e": torch.zeros(0), "w": torch.zeros(3)}, path)
    monkeypatch.setattr(os, "sendfile", lambda *args: pytest.fail("sendfile called for an empty tensor"))
    SafetensorsFile(path).prefetch("e")


def test_unknown_tensor_name(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="no tensor named 'x'"):
        SafetensorsFile(path).tensor("x")


# -- header validation: each case is a crafted file and the message fragment it must produce --

BAD_HEADERS = {
    "unknown dtype": ({"w": {**F32_2, "dtype": "F17"}}, 8, "unknown dtype 'F17'"),
    "missing key": ({"w": {"dtype": "F32", "shape": [2]}}, 8, "exactly the keys"),
    "extra key": ({"w": {**F32_2, "extra": 1}}, 8, "exactly the keys"),
    "entry not object": ({"w": [1, 2]}, 8, "exactly the keys"),
    "negative shape": ({"w": {**F32_2, "shape": [-2]}}, 8, "non-negative integers"),
    "float shape": ({"w": {**F32_2, "shape": [2.0]}}, 8, "non-negative integers"),
    "bool shape": ({"w": {**F32_2, "shape": [True, True]}}, 8, "non-negative integers"),
    "shape not list": ({"w": {**F32_2, "shape": 2}}, 8, "non-negative integers"),
    "offsets past end": ({"w": {**F32_2, "data_offsets": [4, 12]}}, 8, "outside the data section"),
    "offsets reversed": ({"w": {**F32_2, "data_offsets": [8, 0]}}, 8, "outside the data section"),
    "negative offset": ({"w": {**F32_2, "data_offsets": [-8, 0]}}, 8, "outside the data section"),
    "one offset": ({"w": {**F32_2, "data_offsets": [0]}}, 8, "must be two integers"),
    "span mismatch": ({"w": {**F32_2, "shape": [3]}}, 16, "needs 12 bytes but data_offsets span 8"),
    "bad metadata": ({"__metadata__": {"k": 1}, "w": F32_2}, 8, "`__metadata__` must map strings"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_entry_is_rejected_naming_file_and_tensor(raw_file, case):
    header, data_len, message = BAD_HEADERS[case]
    path = raw_file(header, bytes(data_len))
    with pytest.raises(CheckpointError, match=message) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value)
    if case != "bad metadata":
        assert "'w'" in str(err.value)


def test_overlapping_spans_are_rejected(raw_file):
    header = {"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}
    with pytest.raises(CheckpointError, match="'a' and 'b' have overlapping data"):
        SafetensorsFile(raw_file(header, bytes(12)))


def test_empty_tensors_may_share_an_offset(raw_file):
    header = {"a": F32_2, "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}
    assert SafetensorsFile(raw_file(header, bytes(8))).tensor("e").numel() == 0


def test_file_shorter_than_eight_bytes(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsFile(path)


def test_header_longer_than_file(raw_file):
    with pytest.raises(CheckpointError, match="larger than the file"):
        SafetensorsFile(raw_file({"w": F32_2}, bytes(8), header_len=10_000))


def test_header_beyond_sane_bound(raw_file):
    with pytest.raises(CheckpointError, match="exceeds"):
        SafetensorsFile(raw_file(b"{}", header_len=MAX_HEADER_BYTES + 1))


@pytest.mark.parametrize(
    "body, message",
    [(b"\xff\xfe{}", "UTF-8 JSON"), (b"{not json", "UTF-8 JSON"), (b"[1, 2]", "JSON object")],
)
def test_header_not_a_json_object(raw_file, body, message):
    with pytest.raises(CheckpointError, match=message):
        SafetensorsFile(raw_file(body))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        SafetensorsFile(tmp_path / "absent.safetensors")
