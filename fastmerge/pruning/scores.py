"""Importance scores: which weights to keep. Higher = more important; all scores are finite and
non-negative fp32 so the histogram threshold (which orders |x|) ranks them directly.

- magnitude: |theta|.
- random:    a uniform draw per element (Philox keyed by seed and tensor name: reproducible).
- fisher:    F_dom * theta^2, the diagonal-Fisher estimate of the domain loss increase when the
             weight is zeroed (optimal-brain-damage saliency).
- gaprune:   Domain Alignment Importance (METHODS.md "GAPrune"):
               DAI = softplus((F_dom |theta| - beta F_gen |theta|) * clamp(1 + alpha s, 0.8, 1.2)
                              + gamma sqrt|theta|)
             Two normalisations make the terms comparable (documented choices):
             * F_dom and F_gen are each divided by their mean over all targeted weights. Raw
               Fisher values are ~1e-8..1e-4 and scale with the loss, so unnormalised they
               vanish next to gamma sqrt|theta| and DAI degenerates into magnitude pruning;
               normalised, "1" means "as important as the average targeted weight".
             * s, the gradient agreement, is per-row cosine of the mean domain and mean general
               gradients (`alignment: row_cosine`, default): an element-wise cosine of two
               scalars is always +-1, while the row (one output neuron's fan-in) is the unit the
               two objectives share, so s varies smoothly in [-1, 1]. `alignment: sign` uses
               per-element sign agreement sign(g_dom) sign(g_gen) in {-1, 0, 1} instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.random import derive_key, philox_uniform
from .config import PruneConfig

ALIGNMENT_CLAMP = (0.8, 1.2)


def magnitude_score(theta: torch.Tensor) -> torch.Tensor:
    return theta.float().abs()


def random_score(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return torch.from_numpy(philox_uniform(derive_key(seed, name, 0), 0, n)).reshape(shape)


def fisher_score(theta: torch.Tensor, fisher_dom: torch.Tensor) -> torch.Tensor:
    t = theta.float()
    return fisher_dom.float() * t * t


def alignment(grad_dom: torch.Tensor, grad_gen: torch.Tensor, how: str) -> torch.Tensor:
    """s in [-1, 1], broadcastable to the weight: per-row cosine ([rows, 1]) or per-element sign."""
    if how == "sign":
        return torch.sign(grad_dom) * torch.sign(grad_gen)
    dom, gen = grad_dom.double().reshape(grad_dom.shape[0], -1), grad_gen.double().reshape(grad_gen.shape[0], -1)
    cosine = (dom * gen).sum(1) / (dom.norm(dim=1) * gen.norm(dim=1)).clamp(min=1e-300)
    return cosine.float().unsqueeze(1)


def gaprune_score(theta: torch.Tensor, fisher_dom: torch.Tensor, fisher_gen: torch.Tensor, s: torch.Tensor,
                  alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """DAI of every element; the Fishers must already be normalised (see the module docstring)."""
    a = theta.float().abs()
    importance = (fisher_dom * a - beta * fisher_gen * a) * torch.clamp(1 + alpha * s, *ALIGNMENT_CLAMP)
    return F.softplus(importance + gamma * a.sqrt())


class Scorer:
    """Computes one tensor's score from its weights and the saved statistics.

    `statistics` maps a data-set name ("domain", "general") to a tensor lookup
    (name -> fp32 tensor, e.g. a statistics Checkpoint's `tensor`); `fisher_means` holds the
    mean Fisher of each set over all targeted weights (gaprune's normalisation).
    """

    def __init__(self, cfg: PruneConfig, statistics: dict, fisher_means: dict[str, float]):
        self.cfg = cfg
        self.statistics = statistics
        self.fisher_means = fisher_means

    def _stat(self, data_set: str, name: str) -> torch.Tensor:
        return self.statistics[data_set](name).float()

    def __call__(self, name: str, theta: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.score == "magnitude":
            return magnitude_score(theta)
        if cfg.score == "random":
            return random_score(name, theta.shape, cfg.seed)
        fisher_dom = self._stat("domain", name + ".fisher")
        if cfg.score == "fisher":
            return fisher_score(theta, fisher_dom)
        s = alignment(self._stat("domain", name + ".grad"), self._stat("general", name + ".grad"), cfg.alignment)
        return gaprune_score(
            theta,
            fisher_dom / self.fisher_means["domain"],
            self._stat("general", name + ".fisher") / self.fisher_means["general"],
            s, cfg.alpha, cfg.beta, cfg.gamma,
        )
