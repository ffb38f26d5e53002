"""Greedy matching pursuit over the shared tokens' rows, which omp, stb (affine.py) and mp_rope
(rope.py) share: pick, one step at a time, the unused atom most correlated with what is still
unexplained of the target."""

from __future__ import annotations

import torch


def orthogonal_matching_pursuit(targets: torch.Tensor, atoms: torch.Tensor, k: int,
                                eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """For each target row (B, D): the indices (B, k) of k atoms (N, D) chosen greedily and the
    least-squares coefficients (B, k) that combine them into the closest point to the target.

    The picked atoms are factored as they come (picked = upper^T @ basis, basis rows
    orthonormal): each new atom is orthogonalized against the basis twice (classical
    Gram-Schmidt with one reorthogonalization, which keeps the basis orthogonal in fp32 for
    large k), and only its new direction is taken off the residual. So a step reads the basis
    once per pass instead of re-projecting the target on all of it; the rows of a batch element
    lie together, so each pass is one contiguous read.
    """
    batch, width = targets.shape
    basis = targets.new_zeros((batch, k, width))
    upper = targets.new_zeros((batch, k, k))
    projections = targets.new_zeros((batch, k))  # the targets' coordinates along the basis rows
    picked = torch.zeros((batch, k), dtype=torch.long, device=targets.device)
    used = torch.zeros((batch, atoms.shape[0]), dtype=torch.bool, device=targets.device)
    residual = targets
    for step in range(k):
        choice = pick_most_correlated(residual, atoms, used)
        picked[:, step] = choice
        column = atoms[choice]
        known = basis[:, :step]
        along = torch.zeros((batch, step), dtype=targets.dtype, device=targets.device)
        for _ in range(2):
            part = torch.bmm(known, column.unsqueeze(-1)).squeeze(-1)
            column = column - torch.bmm(part.unsqueeze(1), known).squeeze(1)
            along = along + part
        length = column.norm(dim=1).clamp(min=eps)
        upper[:, :step, step] = along
        upper[:, step, step] = length
        direction = column / length.unsqueeze(1)
        basis[:, step] = direction
        projections[:, step] = (direction * targets).sum(dim=1)
        residual = residual - direction * (direction * residual).sum(dim=1, keepdim=True)
    coefficients = torch.linalg.solve_triangular(upper, projections.unsqueeze(-1), upper=True).squeeze(-1)
    return picked, coefficients


def pick_most_correlated(residual: torch.Tensor, atoms: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Each row's pick (B,): the atom (N, D) not yet `used` (B, N; marked here) with the largest
    |dot product| with the residual (B, D), the first on a tie."""
    choice = (residual @ atoms.T).abs_().masked_fill_(used, -float("inf")).argmax(dim=1)
    used[torch.arange(residual.shape[0], device=residual.device), choice] = True
    return choice
