"""Moves tensors between host memory and a CUDA device through a small ring of pinned buffers.

A copy from pageable memory (the engine's inputs are mmap views) makes the CUDA driver stage it
through a pinned buffer of its own and blocks the calling thread until the copy is done. The
stager does that staging itself, chunk by chunk, through `slots` pinned buffers on a side
stream: the host copy of chunk k+1 into one buffer overlaps the DMA of chunk k out of the
other, the transfers overlap the merge running on the compute stream, and the pinned memory is
`slots x chunk_bytes` however large the tensor is, so `--device cuda` keeps host memory bounded.

The CUDA calls sit behind a small transport (`CudaTransport`), so the ring's ordering (never
refill a buffer whose DMA may still be reading it, never read a buffer before its DMA is done)
is tested on the CPU with a transport whose copies run late, as a stream's would.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator, Protocol, Sequence

import torch

DEFAULT_CHUNK_BYTES = 32 << 20


class Event(Protocol):
    def synchronize(self) -> None: ...


class Transport(Protocol):
    """The device operations the stager needs; copies are queued on one side stream."""

    def pinned(self, nbytes: int) -> torch.Tensor: ...
    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor: ...
    def copy(self, target: torch.Tensor, source: torch.Tensor) -> None: ...
    def record(self) -> Event: ...
    def wait(self, event: Any) -> None: ...
    def consume(self, tensors: Sequence[torch.Tensor], ready: Any) -> None: ...
    def produced(self) -> Any: ...


class CudaTransport:
    """One side stream on one CUDA device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        # Allocated for the side stream, which writes it; `consume` tells the allocator that
        # the compute stream reads it too.
        with torch.cuda.stream(self.stream):
            return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            target.copy_(source, non_blocking=True)

    def record(self) -> torch.cuda.Event:
        """An event that completes once everything queued on the side stream so far has.
        Blocking, so a thread waiting on it sleeps instead of spinning a core the host copies
        could use."""
        event = torch.cuda.Event(blocking=True)
        event.record(self.stream)
        return event

    def wait(self, event: torch.cuda.Event) -> None:
        """Make the side stream wait for `event` (a result the compute stream produced)."""
        self.stream.wait_event(event)

    def consume(self, tensors: Sequence[torch.Tensor], ready: torch.cuda.Event) -> None:
        """Hand uploaded tensors to the calling thread's current (compute) stream: it waits for
        their copies, and the allocator will not reuse their memory for a later upload until
        the compute stream's work on them is done."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        for tensor in tensors:
            tensor.record_stream(current)

    def produced(self) -> torch.cuda.Event:
        """An event on the calling thread's current stream: its results so far are ready."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


class PinnedStager:
    """Uploads host tensors and downloads device tensors through a ring of pinned buffers.

    A stager, its ring and its side stream belong to one thread: the engine gives its reader
    thread one for uploads and its writer thread another for downloads. (`consume` and
    `produced` keep no state and are called on the merging thread.)
    """

    def __init__(self, transport: Transport, chunk_bytes: int = DEFAULT_CHUNK_BYTES, slots: int = 2):
        if chunk_bytes < 1 or slots < 1:
            raise ValueError(f"a pinned ring needs chunk_bytes >= 1 and slots >= 1, got {chunk_bytes} and {slots}")
        self.transport = transport
        self._chunk = chunk_bytes
        self._buffers = [transport.pinned(chunk_bytes) for _ in range(slots)]
        # The event after which each buffer may be refilled (its DMA has read it); None: free.
        self._busy_until: list[Event | None] = [None] * slots
        self._turn = 0

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """Queue `host`'s bytes to a new device tensor. When this returns, `host` has been
        read (its pages may be released); the device tensor is complete once an event from
        `ready()` recorded after this call is."""
        device_tensor = self.transport.empty(host.shape, host.dtype)
        for source, target in self._chunk_pairs(host.contiguous(), device_tensor):
            slot, buffer = self._next_buffer(source.numel())
            buffer.copy_(source)
            self.transport.copy(target, buffer)
            self._busy_until[slot] = self.transport.record()
        return device_tensor

    def ready(self) -> Event:
        """An event that completes once every upload queued so far has."""
        return self.transport.record()

    def download(self, device_tensor: torch.Tensor, produced: Any) -> torch.Tensor:
        """Copy a device tensor, complete once the compute stream's event `produced` is, into
        a new host tensor; returns when the host tensor is filled. The device tensor must be
        contiguous: making it so here would run on this thread's stream, unordered with the
        copies out."""
        if not device_tensor.is_contiguous():
            raise ValueError("download needs a contiguous device tensor")
        host = torch.empty(device_tensor.shape, dtype=device_tensor.dtype)
        self.transport.wait(produced)
        in_flight: deque[tuple[Event, torch.Tensor, torch.Tensor]] = deque()
        for source, target in self._chunk_pairs(device_tensor, host):
            if len(in_flight) == len(self._buffers):
                _unload(*in_flight.popleft())
            _, buffer = self._next_buffer(source.numel())
            self.transport.copy(buffer, source)
            in_flight.append((self.transport.record(), buffer, target))
        while in_flight:
            _unload(*in_flight.popleft())
        return host

    def _next_buffer(self, nbytes: int) -> tuple[int, torch.Tensor]:
        slot = self._turn
        self._turn = (slot + 1) % len(self._buffers)
        busy = self._busy_until[slot]
        if busy is not None:
            busy.synchronize()
            self._busy_until[slot] = None
        return slot, self._buffers[slot][:nbytes]

    def _chunk_pairs(self, source: torch.Tensor, target: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        source_bytes, target_bytes = _as_bytes(source), _as_bytes(target)
        for offset in range(0, source_bytes.numel(), self._chunk):
            end = offset + self._chunk
            yield source_bytes[offset:end], target_bytes[offset:end]


def _unload(done: Event, buffer: torch.Tensor, target: torch.Tensor) -> None:
    done.synchronize()
    target.copy_(buffer)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a flat uint8 view (0-d and empty tensors included)."""
    return tensor.reshape(-1).view(torch.uint8)
