"""DARE (drop and rescale): keep each task-vector element with probability density, rescale the
survivors. The merge itself is the fused TIES-family op with the `random` sparsifier
(fastmerge/ops/ties.py); this module names the DARE forms and exposes the mask, whose draws come
from Philox keyed per (seed, tensor name, model) so every backend drops the same elements."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import KernelError
from .random import derive_key, uniform_draws
from .ties import ties_merge


def dare_mask(shape: Sequence[int], density: float, seed: int, tensor_name: str, model_index: int,
              device: torch.device | str = "cpu", backend: str | None = None) -> torch.Tensor:
    """Which elements DARE keeps for one model's task vector: u < fp32(density)."""
    if not 0.0 <= density <= 1.0:
        raise KernelError(f"DARE density for {tensor_name} (model {model_index}) must be in [0, 1], got {density}")
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniform_draws(derive_key(seed, tensor_name, model_index), n, device=device, backend=backend)
    return (u < float(np.float32(density))).reshape(tuple(shape))


def dare_merge(base: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float],
               densities: Sequence[float], seed: int, tensor_name: str, consensus: bool = False,
               normalize: bool = False, rescale: bool = True, rescale_mode: str = "l1", lam: float = 1.0,
               out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """dare_linear (consensus=False) or dare_ties (consensus=True), mergekit's defaults."""
    return ties_merge(base, inputs, weights, densities=densities, normalize=normalize, lam=lam,
                      out_dtype=out_dtype, sparsify="random", consensus=consensus, rescale=rescale,
                      rescale_mode=rescale_mode, seed=seed, tensor_name=tensor_name, backend=backend)
