"""From scores to keep-masks at the requested sparsity.

- global (default): one threshold over all targeted weights, found with the model-wide
  histogram (`fastmerge.ops.MagnitudeHistogram`: two streaming passes over the scores, no
  concatenation, no sort). Exactly k = int((1 - sparsity) * N) weights are kept over the N
  targeted ones: every score above the threshold, then ties in target order and flat index.
- per_tensor: the same rule inside each tensor (k_t = int((1 - sparsity) * n_t)).
- 2:4: in every 4 consecutive weights of a row keep the 2 best scores (`semi_structured_mask`).

Scores are recomputed on each pass instead of stored, so memory stays one tensor's worth.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..errors import ConfigError
from ..ops import MagnitudeHistogram, density_to_k, keep_mask, magnitude_threshold, semi_structured_mask

# name -> that tensor's scores (finite, non-negative fp32)
ScoreFn = Callable[[str], torch.Tensor]


def select_masks(targets: list[str], score_of: ScoreFn, sparsity: float, budget: str, structure: str,
                 backend: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, bool keep-mask) for every target, in order."""
    density = 1.0 - sparsity
    if structure == "2:4":
        for name in targets:
            scores = score_of(name)
            if scores.shape[-1] % 4:
                raise ConfigError(f"structure 2:4 needs rows of a multiple of 4 weights; {name} has {scores.shape[-1]}")
            yield name, semi_structured_mask(scores)
        return
    if budget == "per_tensor":
        for name in targets:
            scores = score_of(name)
            threshold = magnitude_threshold(scores, density_to_k(density, scores.numel()), backend=backend, name=name)
            yield name, keep_mask(scores, threshold)
        return
    histogram = MagnitudeHistogram(density, backend=backend, name="pruning scores")
    for name in targets:
        histogram.add(score_of(name))
    histogram.refine()
    for name in targets:
        histogram.add(score_of(name))
    for index, name in enumerate(targets):
        yield name, keep_mask(score_of(name), histogram.tensor_threshold(index))
