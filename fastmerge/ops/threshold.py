"""Exact magnitude selection: the k-th largest |x| in O(n), without sorting.

Why histograms: non-negative IEEE floats order like their bit patterns, so the k-th largest |x|
is found by counting. Pass 1 bins the top 16 bits of the fp32 pattern of |x| and finds the bin
holding the k-th largest; pass 2 bins the low 16 bits of the elements in that bin, which pins the
exact value. Two streaming passes, 65536 counters, no sort, no copy of the tensor, and integer
counts make the answer independent of thread count and backend.

On the native backend `magnitude_thresholds` usually needs one pass: a strided sample predicts a
narrow window of buckets holding the threshold, and one pass counts the elements above the window
and histograms those inside it, which pins the threshold and tells where to look for the tie
cut-off (csrc/topk_select.cpp).

Keep-exactly-k rule (DESIGN.md "Magnitude selection"): keep every |x| > t, then the elements with
|x| == t in ascending flat index until k are kept. A `Threshold` therefore carries t and how many
of its ties to keep. `MagnitudeHistogram` does the same over many tensors (a model's whole task
vector), with ties ordered by tensor (in the order added) and then by flat index.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from ..dtypes import native_code
from ..errors import KernelError
from ..values import is_integer
from ._dispatch import helper_backend, resolve_backend

BINS = 65536
BACKENDS = ("reference", "native", "cuda")


def threshold_backend(device: torch.device, run_backend: str | None) -> str:
    """The backend of the selection ops here for a merge whose element pass runs on
    `run_backend` (`_dispatch.helper_backend`'s rule over this module's BACKENDS)."""
    return helper_backend(device, BACKENDS, run_backend)


@dataclass(frozen=True)
class Threshold:
    """Keep |x| > value, plus the first `ties_to_keep` elements with |x| == value (flat order).

    value is an fp32 number (or +inf for "keep nothing"); tie_count, when known, is how many
    elements equal it, which lets kernels skip the scan for the tie cut-off when all are kept;
    cutoff, when known, is that cut-off (`tie_cutoff`) in the tensor the threshold was computed
    from, so it is only valid for that tensor.
    """

    value: float
    ties_to_keep: int
    tie_count: int | None = None
    cutoff: int | None = None

    @property
    def bits(self) -> int:
        """The fp32 bit pattern of value (what the kernels compare against)."""
        return struct.unpack("<I", struct.pack("<f", self.value))[0]


KEEP_NOTHING = Threshold(float("inf"), 0, 0, 0)
# Elements in the strided sample with which the native selection predicts where the threshold
# lies (more: a narrower window to histogram, but a slower sample).
SELECT_SAMPLE = 65536


def density_to_k(density: float, n: int) -> int:
    """Elements a magnitude sparsifier keeps: int(density * n), as mergekit rounds it."""
    if not 0.0 <= density <= 1.0:
        raise KernelError(f"density must be in [0, 1], got {density}")
    return int(density * n)


def _bits_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _abs_bits(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """fp32 bit patterns of |x - b| as int64 (the reference histogram's input)."""
    d = x.reshape(-1).to(torch.float32)
    if base is not None:
        d = d - base.reshape(-1).to(torch.float32)
    return (d.view(torch.int32).to(torch.int64) & 0x7FFFFFFF)


def _reference_histogram(x, base, phase: int, bucket: int, hist: np.ndarray) -> int:
    bits = _abs_bits(x, base)
    nan = int((bits > 0x7F800000).sum())
    bits = bits[bits <= 0x7F800000]
    if phase == 1:
        sel = bits >> 16
    else:
        sel = bits[(bits >> 16) == bucket] & 0xFFFF
    hist += torch.bincount(sel, minlength=BINS).cpu().numpy()
    return nan


def _native_histogram(x, base, phase: int, bucket: int, hist: np.ndarray) -> int:
    from .. import _native

    x = x.contiguous()
    base = base.contiguous() if base is not None else None
    return _native.magnitude_histogram(
        x.data_ptr(), native_code(x.dtype),
        base.data_ptr() if base is not None else 0, native_code(base.dtype) if base is not None else 0,
        x.numel(), hist.ctypes.data, phase, bucket,
    )


def _cuda_histogram(x, base, phase: int, bucket: int, hist: np.ndarray) -> int:
    """The CUDA kernel (csrc/cuda/selection.cu), queued on torch's current stream; reading the
    counts back waits for it. A forced `backend="cuda"` on CPU tensors copies them to the GPU."""
    from .. import _native

    device = x.device if x.is_cuda else torch.device("cuda", torch.cuda.current_device())
    x = x.to(device).contiguous()
    base = base.to(device).contiguous() if base is not None else None
    counts = torch.zeros(BINS + 1, dtype=torch.int64, device=device)  # the bins, then the NaN count
    _native.cuda_magnitude_histogram(
        x.data_ptr(), native_code(x.dtype),
        base.data_ptr() if base is not None else 0, native_code(base.dtype) if base is not None else 0,
        x.numel(), counts.data_ptr(), counts[BINS:].data_ptr(), phase, bucket,
        device.index, torch.cuda.current_stream(device).cuda_stream,
    )
    counts = counts.cpu().numpy()
    hist += counts[:BINS]
    return int(counts[BINS])


_HISTOGRAMS: dict[str, Callable[..., int]] = {
    "reference": _reference_histogram, "native": _native_histogram, "cuda": _cuda_histogram,
}


def accumulate_histogram(x, base, phase: int, bucket: int, hist: np.ndarray, backend: str, name: str) -> None:
    """Add |x - b|'s phase-1 or phase-2 histogram to `hist` (int64[65536]); NaN -> KernelError."""
    if x.numel() == 0:
        return
    if _HISTOGRAMS[backend](x, base, phase, bucket, hist):
        raise KernelError(f"{name} contains NaN; magnitude selection needs finite or infinite values")


def _bin_of_kth(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest, number of elements in higher bins); 1 <= k <= hist.sum()."""
    from_top = np.cumsum(hist[::-1])
    j = int(np.searchsorted(from_top, k))
    b = BINS - 1 - j
    return b, int(from_top[j] - hist[b])


def _threshold_from(bucket: int, above: int, fine: np.ndarray, k: int) -> Threshold:
    """Finish the selection: `fine` is the phase-2 histogram of `bucket`, `above` the count in
    higher coarse bins."""
    low, above_fine = _bin_of_kth(fine, k - above)
    greater = above + above_fine
    return Threshold(_bits_value((bucket << 16) | low), k - greater, int(fine[low]))


def magnitude_threshold(x: torch.Tensor, k: int, base: torch.Tensor | None = None, backend: str | None = None,
                        name: str = "tensor") -> Threshold:
    """The keep-exactly-k threshold of |x| (or |x - base|). k <= 0 keeps nothing, k >= n all."""
    return magnitude_thresholds(x, [k], base=base, backend=backend, name=name)[0]


def magnitude_thresholds(x: torch.Tensor, ks: Sequence[int], base: torch.Tensor | None = None,
                         backend: str | None = None, name: str = "tensor") -> list[Threshold]:
    """`magnitude_threshold` for several ks of one tensor (breadcrumbs needs two), each with
    its tie cut-off. Each pass reads the whole tensor, so the ks share them: on the native
    backend one pass for all (usually), otherwise one coarse pass and one fine pass per distinct
    bucket."""
    backend = resolve_backend("magnitude_threshold", [x, base], BACKENDS, backend)
    for k in ks:
        if not is_integer(k):
            raise KernelError(f"{name}: k must be an integer (how many elements to keep), got {k!r}")
    n = x.numel()
    if base is not None and base.numel() != n:
        raise KernelError(f"{name}: base has {base.numel()} elements, tensor has {n}")
    if n == 0:
        return [KEEP_NOTHING] * len(ks)
    clamped = [min(k, n) for k in ks]
    wanted = sorted({k for k in clamped if k > 0})
    if backend == "native":
        found = _native_select(x, base, wanted, name)
    else:
        found = _histogram_select(x, base, wanted, backend, name)
    by_k = dict(zip(wanted, found))
    return [by_k[k] if k > 0 else KEEP_NOTHING for k in clamped]


def _native_select(x, base, ks: list[int], name: str) -> list[Threshold]:
    """The one-pass native selection (also run for no k, so NaN is always noticed)."""
    from .. import _native

    x = x.contiguous()
    base = base.contiguous() if base is not None else None
    n = x.numel()
    found, nans = _native.select_top_k(
        x.data_ptr(), native_code(x.dtype),
        base.data_ptr() if base is not None else 0, native_code(base.dtype) if base is not None else 0,
        n, ks, SELECT_SAMPLE)
    if nans:
        raise KernelError(f"{name} contains NaN; magnitude selection needs finite or infinite values")
    return [Threshold(_bits_value(bits), keep, count, cut) for bits, keep, count, cut in found]


def _histogram_select(x, base, ks: list[int], backend: str, name: str) -> list[Threshold]:
    """Two histogram passes (the coarse one shared by every k, one fine pass per distinct
    bucket), then each threshold's tie cut-off."""
    # The coarse pass runs even without a k, so k never changes whether NaN is noticed.
    coarse = np.zeros(BINS, dtype=np.int64)
    accumulate_histogram(x, base, 1, 0, coarse, backend, name)
    fines: dict[int, np.ndarray] = {}
    thresholds = []
    for k in ks:
        bucket, above = _bin_of_kth(coarse, k)
        if bucket not in fines:
            fines[bucket] = np.zeros(BINS, dtype=np.int64)
            accumulate_histogram(x, base, 2, bucket, fines[bucket], backend, name)
        t = _threshold_from(bucket, above, fines[bucket], k)
        thresholds.append(replace(t, cutoff=tie_cutoff(x, t, base=base, backend=backend)))
    return thresholds


def keep_mask(x: torch.Tensor, threshold: Threshold, base: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (shape of x) of the elements the keep-exactly-k rule keeps."""
    a = _abs_bits(x, base)
    t = threshold.bits
    ties = a == t
    keep = (a > t) | (ties & (torch.cumsum(ties, 0) <= threshold.ties_to_keep))
    return keep.reshape(x.shape)


def tie_cutoff(x: torch.Tensor, threshold: Threshold, base: torch.Tensor | None = None,
               backend: str | None = None) -> int:
    """Exclusive flat-index end of the kept ties: keep |x| == t exactly where index < cut-off."""
    n = x.numel()
    if threshold.cutoff is not None:
        return threshold.cutoff
    if threshold.ties_to_keep <= 0:
        return 0
    if threshold.tie_count is not None and threshold.ties_to_keep >= threshold.tie_count:
        return n
    backend = resolve_backend("tie_cutoff", [x, base], BACKENDS, backend)
    if backend == "native":
        from .. import _native

        x = x.contiguous()
        base = base.contiguous() if base is not None else None
        return _native.tie_cutoff(
            x.data_ptr(), native_code(x.dtype),
            base.data_ptr() if base is not None else 0, native_code(base.dtype) if base is not None else 0,
            n, threshold.bits, threshold.ties_to_keep,
        )
    # reference, and cuda (the scan is one torch nonzero on the device; no kernel of its own)
    where = torch.nonzero(_abs_bits(x, base) == threshold.bits).reshape(-1)
    return int(where[threshold.ties_to_keep]) if threshold.ties_to_keep < where.numel() else n


class MagnitudeHistogram:
    """Keep-exactly-k thresholds over many tensors (a model's whole task vector), fed tensor by
    tensor so memory stays one tensor (DESIGN.md "Memory").

    Usage: `add` every tensor (phase 1: coarse histogram), call `refine()`, `add` the same
    tensors again in the same order (phase 2: exact values), then `threshold()` for the global
    threshold and `tensor_threshold(i)` for the i-th tensor's share of it: ties at the threshold
    are kept by tensor in the order added, then by flat index. Phase 2 remembers, per tensor, the
    non-zero fine bins only, to split the ties.

    By default one k = int(density * total); `ranks` instead maps the total element count to
    several ks (breadcrumbs needs two: the outliers it drops and the band it keeps), found from
    the one coarse pass; thresholds are then picked with `which`.
    """

    def __init__(self, density: float, backend: str | None = None, name: str = "task vector",
                 ranks: Callable[[int], Sequence[int]] | None = None):
        self.density = density
        self.backend = backend
        self.name = name
        self._ranks = ranks or (lambda total: (density_to_k(density, total),))
        self._coarse = np.zeros(BINS, dtype=np.int64)
        self._sizes: list[int] = []
        # Per tensor: {bucket: (non-zero fine bins, their counts)} for every bucket refined.
        self._fine: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
        self._phase = 1
        self._ks: tuple[int, ...] = ()
        self._buckets: list[tuple[int, int]] = []  # (bucket, count above it) per k

    def add(self, x: torch.Tensor, base: torch.Tensor | None = None) -> None:
        """Count |x - base| in the current phase."""
        backend = resolve_backend("magnitude_histogram", [x, base], BACKENDS, self.backend)
        label = f"{self.name} tensor #{len(self._sizes) if self._phase == 1 else len(self._fine)}"
        if self._phase == 1:
            accumulate_histogram(x, base, 1, 0, self._coarse, backend, label)
            self._sizes.append(x.numel())
            return
        i = len(self._fine)
        if i >= len(self._sizes) or self._sizes[i] != x.numel():
            raise KernelError(f"{label}: phase 2 must add the same tensors, in the same order, as phase 1")
        sparse = {}
        for bucket in sorted({bucket for bucket, _ in self._buckets}):
            fine = np.zeros(BINS, dtype=np.int64)
            accumulate_histogram(x, base, 2, bucket, fine, backend, label)
            bins = np.nonzero(fine)[0]
            sparse[bucket] = (bins, fine[bins])
        self._fine.append(sparse)

    def refine(self) -> None:
        """End phase 1: fix the ks from the total size and the bins to refine."""
        if self._phase != 1:
            raise KernelError("MagnitudeHistogram.refine() called twice")
        self._phase = 2
        total = sum(self._sizes)
        self._ks = tuple(min(max(int(k), 0), total) for k in self._ranks(total))
        self._buckets = [_bin_of_kth(self._coarse, k) if k else (0, 0) for k in self._ks]

    def _check_done(self) -> None:
        if self._phase != 2 or len(self._fine) != len(self._sizes):
            raise KernelError("MagnitudeHistogram: add every tensor, refine(), then add them all again first")

    def threshold(self, which: int = 0) -> Threshold:
        """The global threshold over every tensor added (for the `which`-th k)."""
        self._check_done()
        k = self._ks[which]
        if not k:
            return KEEP_NOTHING
        bucket, above = self._buckets[which]
        fine = np.zeros(BINS, dtype=np.int64)
        for sparse in self._fine:
            bins, counts = sparse[bucket]
            fine[bins] += counts
        return _threshold_from(bucket, above, fine, k)

    def tensor_threshold(self, index: int, which: int = 0) -> Threshold:
        """The global threshold with the ties split: tensor `index` keeps the ties left over
        after the tensors added before it took theirs."""
        total = self.threshold(which)
        if total is KEEP_NOTHING:
            return KEEP_NOTHING
        bucket, low = total.bits >> 16, total.bits & 0xFFFF

        def ties_in(i: int) -> int:
            bins, counts = self._fine[i][bucket]
            hit = np.nonzero(bins == low)[0]
            return int(counts[hit[0]]) if hit.size else 0

        before = sum(ties_in(i) for i in range(index))
        mine = ties_in(index)
        return Threshold(total.value, max(0, min(mine, total.ties_to_keep - before)), mine)
