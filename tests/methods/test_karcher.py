"""karcher against the Riemannian-mean iteration written out on full vectors in fp64."""

from __future__ import annotations

import pytest
import torch

from fastmerge import merge_tensors


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def karcher_formula(tensors, max_iter=10, tol=1e-5):
    """Fixed-point iteration of the Karcher mean on the unit sphere, equal weights, scaled by
    the mean norm: log-map every point to the tangent space at the mean, average, exp-map."""
    vs = [t.double().flatten() for t in tensors]
    norms = [v.norm() for v in vs]
    units = [v / n for v, n in zip(vs, norms)]
    mean = sum(units) / len(units)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            cos = torch.clamp(mean @ u, -1, 1)
            theta = torch.arccos(cos)
            if theta >= tol:
                tangent += theta / torch.sin(theta) * (u - cos * mean) / len(units)
        step = tangent.norm()
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * tangent / step
        mean = mean / mean.norm()
    return (sum(norms) / len(norms) * mean).reshape(tensors[0].shape)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_karcher_matches_iteration(count):
    xs = [rand(9, 11, seed=s) * (1 + s) for s in range(count)]
    expected = karcher_formula(xs)
    out = merge_tensors("karcher", xs)
    assert (out.double() - expected).abs().max() <= 2e-6 * expected.abs().max()


def test_karcher_max_iter_changes_the_result():
    xs = [rand(40, seed=s) for s in range(3)]
    one = merge_tensors("karcher", xs, max_iter=1)
    assert (one.double() - karcher_formula(xs, max_iter=1)).abs().max() <= 2e-6
    assert not torch.allclose(one, merge_tensors("karcher", xs), atol=1e-4)


def test_karcher_ignores_zero_models_for_direction_but_counts_their_norm():
    x, zero = rand(6, 4, seed=1), torch.zeros(6, 4)
    out = merge_tensors("karcher", [x, zero])
    assert torch.allclose(out.double(), x.double() / 2, atol=1e-6)
    assert torch.equal(merge_tensors("karcher", [zero, zero]), zero)


def test_karcher_of_one_model_is_that_model():
    x = rand(5, seed=2)
    assert torch.equal(merge_tensors("karcher", [x]), x)
