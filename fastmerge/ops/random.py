"""Counter-based randomness for sampled sparsifiers (DARE, DELLA): Philox4x32-10.

Why counter-based: the draw for element i of model j of tensor T is a pure function of
(key(seed, T, j), i), so the native CPU kernel, the Triton kernel and this reference produce the
same mask whatever the thread count, block size, device or tensor visiting order
(DESIGN.md "Randomness").

The generator is exactly Triton's `tl.rand(seed, offsets)` (triton/language/random.py):
key (k0, k1) = (low, high) 32-bit halves of the 64-bit seed; counter (c0, c1, c2, c3) =
(low, high) halves of the 64-bit offset, 0, 0; ten Philox rounds; the first output word is read
as int32, negatives are bit-inverted (~x), converted to fp32 (round to nearest even) and
multiplied in fp32 by 4.6566127342e-10, which gives a float in [0, 1). csrc/philox.h is the same
in C++, and tests/ops/test_dare.py checks all three agree bit for bit.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..errors import KernelError
from ._dispatch import resolve_backend

DRAW_BACKENDS = ("reference", "native", "triton")

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
# Largest fp32 scale with INT32_MAX * scale < 1 after fp32 rounding (Triton's constant).
UNIFORM_SCALE = np.float32(4.6566127342e-10)

_MASK32 = np.uint64(0xFFFFFFFF)


def derive_key(seed: int, tensor_name: str, model_index: int) -> int:
    """The 64-bit Philox key for one model's draws on one tensor.

    key = first 8 bytes, little-endian, of blake2b(digest_size=8) over
    seed (8 bytes LE) || model_index (4 bytes LE) || UTF-8 tensor name. blake2b is in every
    Python and stable across processes and platforms (unlike `hash()`), and hashing all three
    together gives unrelated streams for neighbouring seeds, names and models.
    """
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise KernelError(f"random seed must be an integer in [0, 2**64), got {seed!r}")
    if not isinstance(model_index, int) or not 0 <= model_index < 2**32:
        raise KernelError(f"model_index must be an integer in [0, 2**32), got {model_index!r}")
    payload = seed.to_bytes(8, "little") + model_index.to_bytes(4, "little") + tensor_name.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def _umulhi(a: int, b: np.ndarray) -> np.ndarray:
    """High 32 bits of a 32x32-bit product; both fit in uint64 without overflow."""
    return (np.uint64(a) * b) >> np.uint64(32)


def philox_uint32(key: int, offset: int, n: int) -> np.ndarray:
    """First Philox4x32-10 output word for counters offset .. offset+n-1 (uint32 array)."""
    if not 0 <= key < 2**64:
        raise KernelError(f"Philox key must be in [0, 2**64), got {key}")
    counters = np.arange(offset, offset + n, dtype=np.uint64)
    c0 = counters & _MASK32
    c1 = counters >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = key & 0xFFFFFFFF, key >> 32
    for _ in range(PHILOX_ROUNDS):
        prev_c0, prev_c2 = c0, c2
        c0 = _umulhi(PHILOX_ROUND_B, prev_c2) ^ c1 ^ np.uint64(k0)
        c2 = _umulhi(PHILOX_ROUND_A, prev_c0) ^ c3 ^ np.uint64(k1)
        c1 = (np.uint64(PHILOX_ROUND_B) * prev_c2) & _MASK32
        c3 = (np.uint64(PHILOX_ROUND_A) * prev_c0) & _MASK32
        k0 = (k0 + PHILOX_KEY_A) & 0xFFFFFFFF
        k1 = (k1 + PHILOX_KEY_B) & 0xFFFFFFFF
    return c0.astype(np.uint32)


def philox_uniform(key: int, offset: int, n: int) -> np.ndarray:
    """Uniform fp32 draws in [0, 1) for counters offset .. offset+n-1, bit-identical to
    Triton's `tl.rand(key, offset + arange(n))`."""
    signed = philox_uint32(key, offset, n).view(np.int32)
    signed = np.where(signed < 0, ~signed, signed)
    return signed.astype(np.float32) * UNIFORM_SCALE


def uniform_draws(key: int, n: int, offset: int = 0, device: torch.device | str = "cpu",
                  backend: str | None = None) -> torch.Tensor:
    """philox_uniform(key, offset + i) for i < n as an fp32 tensor on `device`, drawn where it
    will be used: the native kernel for the CPU, the Triton one for a GPU (same bits)."""
    device = torch.device(device)
    probe = torch.empty(0, device=device)
    name = resolve_backend("uniform_draws", [probe], DRAW_BACKENDS, backend)
    if name == "native":
        from .. import _native

        out = torch.empty(n, dtype=torch.float32)
        _native.philox_fill(out.data_ptr(), key, offset, n)
        return out
    if name == "triton":
        from .triton_kernels.dare import uniform

        return uniform(key, offset, n, device)
    return torch.from_numpy(philox_uniform(key, offset, n)).to(device)
