import pytest
import torch

from fastmerge.errors import ConfigError
from fastmerge.representations.typical import kmeans, select_typical


def _blobs(seed=0):
    """Three well separated blobs of 10 points; the centre of each is a known point."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    points = []
    for c in centres:
        offsets = torch.randn(9, 2, generator=g, dtype=torch.float64)
        offsets -= offsets.mean(dim=0)  # the blob's mean is exactly its centre ...
        points.append(torch.cat([c + offsets, c[None]]))  # ... and the centre itself is a sample
    return torch.cat(points)


def test_picks_the_sample_at_each_cluster_centre():
    points = _blobs()
    assert select_typical(points, 3, seed=1) == [9, 19, 29]


def test_seeded_and_deterministic():
    g = torch.Generator().manual_seed(5)
    points = torch.randn(200, 8, generator=g)
    first = select_typical(points, 16, seed=7)
    assert first == select_typical(points, 16, seed=7)
    assert len(set(first)) == 16 and first == sorted(first)


def test_kmeans_converges_to_blob_means():
    centroids = kmeans(_blobs(), 3, seed=0)
    found = sorted(tuple(round(v, 6) for v in c.tolist()) for c in centroids)
    assert found == [(0.0, 0.0), (0.0, 10.0), (10.0, 0.0)]


def test_k_at_least_n_uses_all():
    points = torch.randn(5, 3)
    assert select_typical(points, 5) == [0, 1, 2, 3, 4]
    assert select_typical(points, 32) == [0, 1, 2, 3, 4]


def test_duplicate_points_still_give_k_distinct_samples():
    points = torch.zeros(6, 4)
    assert select_typical(points, 3) == [0, 1, 2]


def test_k_must_be_positive():
    with pytest.raises(ConfigError, match="num_typical"):
        select_typical(torch.zeros(3, 2), 0)
