"""Backend selection for the ops (DESIGN.md "Backends and dispatch").

Order of precedence: the call's `backend=`, then the FASTMERGE_BACKEND environment variable,
then the device: CUDA tensors go to triton (or cuda where an op registers it first), CPU
tensors to native. `reference` (plain torch) is always available and is the test oracle.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Iterable, Sequence

import torch

from ..errors import KernelError

ALL_BACKENDS = ("reference", "native", "triton", "cuda")


@functools.lru_cache(maxsize=None)
def _native_available() -> bool:
    try:
        from .. import _native  # noqa: F401
    except ImportError as error:
        # Every op still runs, on the plain-torch reference, but many times slower: say why.
        warnings.warn(f"fastmerge's native kernels are unavailable, CPU ops run on the slower plain-torch "
                      f"reference: {error}", RuntimeWarning, stacklevel=2)
        return False
    return True


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    if not (_native_available() and torch.cuda.is_available()):
        return False
    from .. import _native

    return _native.has_cuda()  # built with FASTMERGE_CUDA=ON and a device the driver can use


# How to tell whether each backend is usable; each check runs once (lru_cache), and only when a
# call could pick that backend, so a CPU merge never pays for importing triton.
_CHECKS = {
    "reference": lambda: True,
    "native": _native_available,
    "triton": _triton_available,
    "cuda": _cuda_available,
}


def available_backends() -> list[str]:
    """Backends usable in this process, in ALL_BACKENDS order."""
    return [name for name in ALL_BACKENDS if _CHECKS[name]()]


def backend_usable(name: str) -> bool:
    """Whether one backend is usable here, checking only that one."""
    return _CHECKS[name]()


def resolve_backend(
    op: str,
    tensors: Sequence[torch.Tensor | None],
    supported: Iterable[str],
    requested: str | None = None,
) -> str:
    """Pick the backend for one call of `op` over `tensors` among the op's `supported` ones.

    The kernels take raw pointers, so a tensor they cannot read (meta, mps, ...; CUDA memory for
    the native backend) is refused here: handed over, it would crash the process. (The cuda
    backend copies CPU tensors to the GPU itself.)"""
    supported = tuple(supported)
    requested = requested or os.environ.get("FASTMERGE_BACKEND") or None
    devices = {t.device.type for t in tensors if t is not None}
    unreadable = devices - {"cpu", "cuda"}
    if unreadable:
        raise KernelError(f"{op}: a tensor is on {', '.join(sorted(unreadable))}; fastmerge's kernels take CPU or CUDA tensors")
    on_cuda = "cuda" in devices
    if requested is not None:
        if requested not in ALL_BACKENDS:
            raise KernelError(f"unknown backend {requested!r} for {op}; use one of {', '.join(ALL_BACKENDS)}")
        if requested not in supported:
            raise KernelError(f"{op} has no {requested!r} backend; it has {', '.join(supported)}")
        if not backend_usable(requested):
            raise KernelError(f"backend {requested!r} is not usable here (see fastmerge.ops.available_backends())")
        if requested == "native" and on_cuda:
            raise KernelError(f"{op}: the native backend cannot read a tensor on cuda")
        return requested
    return _device_default(on_cuda, supported)


def helper_backend(device: torch.device, supported: Iterable[str], run_backend: str | None) -> str:
    """The backend of a helper op (a threshold, a Gram matrix) inside a merge whose element pass
    runs on `run_backend` (None: FASTMERGE_BACKEND or the default).

    One rule for every method, so a forced backend means the same everywhere: `reference`
    forces the oracle end to end; a backend the helper has and can use here is kept; otherwise
    (say triton, which has no threshold kernel) the helper takes its own default for the device.
    """
    supported = tuple(supported)
    run_backend = run_backend or os.environ.get("FASTMERGE_BACKEND") or None
    if run_backend == "reference":
        return "reference"
    if run_backend in supported and backend_usable(run_backend):
        return run_backend
    return _device_default(device.type == "cuda", supported)


def _device_default(on_cuda: bool, supported: tuple[str, ...]) -> str:
    """The fastest usable backend among `supported` for tensors on CUDA or on the CPU."""
    preference = ("cuda", "triton") if on_cuda else ("native",)
    for name in preference:
        if name in supported and backend_usable(name):
            return name
    return "reference"
