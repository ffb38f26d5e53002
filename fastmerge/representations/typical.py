"""Typical-sample selection: k-means (k-means++ init, seeded) over sample embeddings, then the
sample nearest each centroid.

RECALL compares models on a few samples that cover the new task's distribution rather than on
all of them: the comparison costs one forward pass per model per sample, and a handful of
cluster representatives carries nearly the same information as the full set. Everything runs
in fp64 on the CPU with an explicit torch.Generator, so the same embeddings and seed pick the
same samples on any machine.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

_MAX_ITERATIONS = 100


def select_typical(embeddings: torch.Tensor, k: int, seed: int = 0) -> list[int]:
    """Indices (ascending) of the `k` samples nearest the k-means centroids of `embeddings` [n, d].

    With k >= n every sample is typical. Each centroid claims the nearest sample not already
    claimed by an earlier centroid, so exactly k distinct samples come back.
    """
    if k < 1:
        raise ConfigError(f"num_typical must be at least 1, got {k}")
    points = embeddings.detach().to("cpu", torch.float64)
    n = points.shape[0]
    if k >= n:
        return list(range(n))
    centroids = kmeans(points, k, seed)
    distances = torch.cdist(centroids, points)
    chosen: list[int] = []
    for row in distances:
        row = row.clone()
        row[chosen] = float("inf")
        chosen.append(int(torch.argmin(row)))
    return sorted(chosen)


def kmeans(points: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Lloyd's algorithm from a k-means++ start; returns the centroids [k, d].

    A cluster that loses all its points keeps its previous centroid (it cannot move anywhere
    meaningful, and re-seeding would make the result depend on more random draws).
    """
    generator = torch.Generator().manual_seed(seed)
    centroids = kmeans_plus_plus(points, k, generator)
    assignment = None
    for _ in range(_MAX_ITERATIONS):
        new_assignment = torch.argmin(torch.cdist(points, centroids), dim=1)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for c in range(k):
            members = points[assignment == c]
            if len(members):
                centroids[c] = members.mean(dim=0)
    return centroids


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: first centre uniform, each next one drawn with probability
    proportional to the squared distance to the nearest centre chosen so far."""
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [first]
    nearest_sq = ((points - points[first]) ** 2).sum(dim=1)
    for _ in range(1, k):
        if float(nearest_sq.sum()) == 0.0:
            # Every remaining point coincides with a centre: take the first unused index.
            unused = [i for i in range(n) if i not in centres]
            nxt = unused[0]
        else:
            nxt = int(torch.multinomial(nearest_sq, 1, generator=generator))
        centres.append(nxt)
        nearest_sq = torch.minimum(nearest_sq, ((points - points[nxt]) ** 2).sum(dim=1))
    return points[centres].clone()
