"""Merge primitives. Each op has one signature and several backends (reference, native, triton,
cuda); `backend=None` picks one by device (DESIGN.md "Backends and dispatch")."""

from ._dispatch import available_backends
from .blend import blend
from .mask import apply_mask, pack_mask, semi_structured_mask, unpack_mask
from .rbf import rbf_similarity
from .dare import dare_mask, dare_merge
from .random import derive_key, philox_uniform
from .threshold import MagnitudeHistogram, Threshold, density_to_k, keep_mask, magnitude_threshold
from .ties import ties_merge

__all__ = [
    "available_backends",
    "blend",
    "apply_mask",
    "pack_mask",
    "unpack_mask",
    "semi_structured_mask",
    "rbf_similarity",
    "dare_mask",
    "dare_merge",
    "derive_key",
    "philox_uniform",
    "MagnitudeHistogram",
    "Threshold",
    "density_to_k",
    "keep_mask",
    "magnitude_threshold",
    "ties_merge",
]
