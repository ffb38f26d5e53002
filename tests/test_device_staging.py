"""The GPU path's pinned double buffers (fastmerge/io/device_staging.py) and the engine's use of
them. Without a GPU they run over `LateTransport`, whose copies happen only when an event
recorded after them is waited for, as a CUDA stream's would run later: a stager that refilled a
pinned buffer before its copy ran, or read one before its copy ran, gets wrong bytes here just
as it would on a device. On a GPU machine the same checks also run over CUDA itself.
"""

from __future__ import annotations

import threading

import pytest
import torch

import fastmerge
import fastmerge.engine as engine
from _support import TINY, load_dir
from fastmerge.demo import fine_tune_of, make_state, write_checkpoint
from fastmerge.io.device_staging import CudaTransport, PinnedStager

POISON = 0xA5


class LateTransport:
    """A CPU stand-in for CudaTransport whose side-stream copies run late."""

    def __init__(self, fail_after: int | None = None):
        self._queue: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ran = 0
        self._lock = threading.Lock()
        self.pinned_bytes = 0
        self._fail_after = fail_after
        self.allocations = 0
        self.copied_bytes = 0
        self.log: list[tuple[str, object]] = []  # ("wait", marker) and ("copy", bytes), in order

    def pinned(self, nbytes: int) -> torch.Tensor:
        self.pinned_bytes += nbytes
        return torch.full((nbytes,), POISON, dtype=torch.uint8)

    def empty(self, shape, dtype) -> torch.Tensor:
        self.allocations += 1
        if self._fail_after is not None and self.allocations > self._fail_after:
            raise RuntimeError("CUDA out of memory (simulated)")
        tensor = torch.empty(tuple(shape), dtype=dtype)
        tensor.reshape(-1).view(torch.uint8).fill_(POISON)
        return tensor

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        with self._lock:
            self._queue.append((target, source))
            self.copied_bytes += source.numel()
            self.log.append(("copy", source.numel()))

    def record(self) -> _LateEvent:
        with self._lock:
            return _LateEvent(self, len(self._queue))

    def run_until(self, position: int) -> None:
        with self._lock:
            while self._ran < position:
                target, source = self._queue[self._ran]
                target.copy_(source)
                self._ran += 1

    def wait(self, event) -> None:
        """The compute 'stream' is the host here, so there is nothing to wait for; the log
        shows whether the side stream was told to."""
        self.log.append(("wait", event))

    def consume(self, tensors, ready: _LateEvent) -> None:
        ready.synchronize()

    def produced(self) -> object:
        return object()


class _LateEvent:
    def __init__(self, transport: LateTransport, position: int):
        self._transport, self._position = transport, position

    def synchronize(self) -> None:
        self._transport.run_until(self._position)


SHAPES = [(), (0,), (0, 3), (1,), (7,), (3, 5), (17, 33), (4099,)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _random(shape, dtype, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dtype)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("chunk_bytes", [3, 64, 1 << 20])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_upload_then_download_gives_the_same_bytes_through_a_bounded_ring(dtype, chunk_bytes, slots):
    uploads, downloads = LateTransport(), LateTransport()
    up, down = PinnedStager(uploads, chunk_bytes, slots), PinnedStager(downloads, chunk_bytes, slots)
    hosts = [_random(shape, dtype, seed=i) for i, shape in enumerate(SHAPES)]
    on_device = [up.upload(host) for host in hosts]
    uploads.consume(on_device, up.ready())
    for host, device_tensor in zip(hosts, on_device):
        assert _same_bytes(device_tensor, host)
        produced, start = downloads.produced(), len(downloads.log)
        assert _same_bytes(down.download(device_tensor, produced), host)
        # The side stream waited for the compute stream's result before copying it out.
        assert downloads.log[start] == ("wait", produced)
        assert all(kind == "copy" for kind, _ in downloads.log[start + 1 :])
    # Pinned memory is the ring, whatever the tensors' sizes.
    assert uploads.pinned_bytes == downloads.pinned_bytes == slots * chunk_bytes


def test_an_upload_is_only_complete_after_its_ready_event():
    """The late transport really defers: without waiting for `ready`, the device tensor still
    holds what the allocator left there (so the tests above would catch a missing wait)."""
    transport = LateTransport()
    stager = PinnedStager(transport, chunk_bytes=64)
    host = _random((40,), torch.float32)
    device_tensor = stager.upload(host)
    assert not _same_bytes(device_tensor, host)
    stager.ready().synchronize()
    assert _same_bytes(device_tensor, host)


def test_uploads_read_non_contiguous_tensors_in_logical_order():
    transport = LateTransport()
    stager = PinnedStager(transport, chunk_bytes=10)
    host = _random((6, 9), torch.bfloat16).t()
    device_tensor = stager.upload(host)
    stager.ready().synchronize()
    assert torch.equal(device_tensor, host)


def test_a_download_refuses_a_non_contiguous_tensor():
    transport = LateTransport()
    with pytest.raises(ValueError, match="contiguous"):
        PinnedStager(transport).download(torch.zeros(4, 6).t(), transport.produced())


@pytest.mark.parametrize("chunk_bytes, slots", [(0, 2), (64, 0)])
def test_an_empty_ring_is_refused(chunk_bytes, slots):
    with pytest.raises(ValueError, match="chunk_bytes >= 1 and slots >= 1"):
        PinnedStager(LateTransport(), chunk_bytes, slots)


def _models_with_an_integer_buffer(tmp_path):
    """A base and two fine-tunes, each with an int64 tensor that a merge copies unchanged."""
    base = make_state(TINY, seed=0)
    paths = {}
    for name, state in (("base", base), ("ft1", fine_tune_of(base, seed=1, scale=0.05)), ("ft2", fine_tune_of(base, seed=2, scale=0.05))):
        state = dict(state, **{"model.position_ids": torch.arange(11, dtype=torch.int64)})
        paths[name] = write_checkpoint(tmp_path / name, state, TINY, max_shard_bytes=20_000)
    return paths


# Per-model and top-level parameters of each method the engine tests run.
METHOD_PARAMETERS = {
    "task_arithmetic": ({}, {}),
    "ties": ({"density": 0.6}, {"normalize": True}),
    "dare_ties": ({"density": 0.6}, {"normalize": True}),
    "della": ({"density": 0.6, "epsilon": 0.1}, {"lambda": 1.0}),
}


def _config(method: str, models: dict) -> dict:
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(models["base"]), "dtype": "bfloat16", "parameters": {"t": 0.3},
                "models": [{"model": str(models["base"])}, {"model": str(models["ft1"])}]}
    per_model, top = METHOD_PARAMETERS[method]
    return {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[n]), "parameters": {"weight": w, **per_model}} for n, w in (("ft1", 0.6), ("ft2", 0.4))],
        "parameters": top,
        "dtype": "bfloat16",
    }


def _late_feed(plan, device, transports=None, **transport_options):
    uploads, downloads = LateTransport(**transport_options), LateTransport()
    if transports is not None:
        transports += [uploads, downloads]
    return engine._DeviceFeed(plan, uploads, downloads)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della", "slerp"])
def test_a_merge_through_the_device_feed_writes_the_bytes_of_a_host_merge(method, tmp_path, monkeypatch):
    models = _models_with_an_integer_buffer(tmp_path)
    host = fastmerge.run(_config(method, models), tmp_path / "host", device="cpu", quiet=True)
    transports = []
    monkeypatch.setattr(engine, "_feed_for", lambda plan, device: _late_feed(plan, device, transports))
    staged = fastmerge.run(_config(method, models), tmp_path / "staged", device="cpu", quiet=True)
    a, b = load_dir(host.output_dir), load_dir(staged.output_dir)
    assert set(a) == set(b) and "model.position_ids" in a
    assert all(_same_bytes(a[name], b[name]) for name in a)
    # Every merged tensor's inputs went up (slerp's base is one of its two models; the task
    # vector methods have a base and two fine-tunes) and its result came back through the
    # rings; the integer tensor did neither.
    uploads, downloads = transports
    merged_bytes = sum(t.nbytes for t in a.values() if t.is_floating_point())
    assert downloads.copied_bytes == merged_bytes
    assert uploads.copied_bytes == (2 if method == "slerp" else 3) * merged_bytes


def test_an_upload_error_on_the_reader_thread_fails_the_merge_and_leaves_no_output(tmp_path, monkeypatch):
    models = _models_with_an_integer_buffer(tmp_path)
    monkeypatch.setattr(engine, "_feed_for", lambda plan, device: _late_feed(plan, device, fail_after=7))
    with pytest.raises(RuntimeError, match="out of memory"):
        fastmerge.run(_config("ties", models), tmp_path / "out", device="cpu", quiet=True)
    assert not (tmp_path / "out").exists()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ring_round_trip(dtype):
    device = torch.device("cuda")
    up, down = PinnedStager(CudaTransport(device), 1 << 10), PinnedStager(CudaTransport(device), 1 << 10)
    hosts = [_random(shape, dtype, seed=i) for i, shape in enumerate(SHAPES)]
    on_device = [up.upload(host) for host in hosts]
    up.transport.consume(on_device, up.ready())
    doubled = [t * 2 for t in on_device]  # work on the compute stream that a download must wait for
    for host, result in zip(hosts, doubled):
        assert result.is_cuda and torch.equal(result.cpu(), host * 2)
        assert _same_bytes(down.download(result, down.transport.produced()), host * 2)


@cuda
@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_a_cuda_merge_writes_the_bytes_of_a_cpu_merge(method, tmp_path):
    models = _models_with_an_integer_buffer(tmp_path)
    on_cpu = fastmerge.run(_config(method, models), tmp_path / "cpu", device="cpu", quiet=True)
    on_gpu = fastmerge.run(_config(method, models), tmp_path / "gpu", device="cuda", quiet=True)
    a, b = load_dir(on_cpu.output_dir), load_dir(on_gpu.output_dir)
    assert set(a) == set(b) and all(_same_bytes(a[name], b[name]) for name in a)
