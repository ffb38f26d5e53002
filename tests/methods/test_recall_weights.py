"""RECALL's layer weights against an independent, loop-by-loop formula."""

import math

import pytest
import torch

from fastmerge.errors import ConfigError
from fastmerge.methods.recall import recall_weights


def _reps(seed, models=3, layers=4, n=5, d=6, spread=(0.0, 0.3, 1.0)):
    """Model k = the new model (last) plus noise of size spread[k] that grows with depth."""
    g = torch.Generator().manual_seed(seed)
    new = torch.randn(layers, n, d, generator=g, dtype=torch.float64)
    out = []
    for k in range(models - 1):
        depth = torch.linspace(0, 1, layers, dtype=torch.float64).view(layers, 1, 1)
        out.append(new + spread[k + 1] * depth * torch.randn(layers, n, d, generator=g, dtype=torch.float64))
    return out + [new]


def _expected(reps, new_index, sigmas, temperature):
    """softmax_k(mean_s exp(-||r_k - r_new||^2 / (2 sigma_l^2)) / T), written out with loops."""
    layers, n = reps[0].shape[0], reps[0].shape[1]
    rows = []
    for l in range(layers):
        sims = []
        for r in reps:
            total = 0.0
            for s in range(n):
                sq = sum((float(a) - float(b)) ** 2 for a, b in zip(r[l, s], reps[new_index][l, s]))
                total += math.exp(-sq / (2 * sigmas[l] ** 2))
            sims.append(total / n)
        exps = [math.exp(v / temperature) for v in sims]
        rows.append([e / sum(exps) for e in exps])
    return torch.tensor(rows, dtype=torch.float64)


def test_given_sigma_matches_formula():
    reps = _reps(0)
    result = recall_weights(reps, new_index=2, temperature=0.5, sigma=1.7)
    torch.testing.assert_close(result.weights, _expected(reps, 2, [1.7] * 4, 0.5), rtol=1e-5, atol=1e-6)


def test_median_heuristic_sigma_is_shared_per_layer_and_used():
    reps = _reps(1)
    result = recall_weights(reps, new_index=2)
    assert result.sigma.shape == (4,) and (result.sigma > 0).all()
    torch.testing.assert_close(result.weights, _expected(reps, 2, result.sigma.tolist(), 1.0), rtol=1e-5, atol=1e-6)


def test_shape_of_the_weights():
    result = recall_weights(_reps(2), new_index=2)
    torch.testing.assert_close(result.weights.sum(dim=1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(result.similarity[:, 2], torch.ones(4, dtype=torch.float64))
    # identical in layer 0 -> uniform; drift grows with depth -> the new model gains weight
    torch.testing.assert_close(result.weights[0], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert (result.weights[1:, 2] > result.weights[1:, 0]).all()
    assert result.weights[3, 2] >= result.weights[1, 2]


def test_lower_temperature_sharpens():
    reps = _reps(3)
    warm = recall_weights(reps, 2, temperature=1.0, sigma=1.0).weights
    cold = recall_weights(reps, 2, temperature=0.1, sigma=1.0).weights
    assert (cold[1:, 2] > warm[1:, 2]).all()


def test_underflow_is_an_error_not_nan():
    reps = _reps(4, spread=(0.0, 50.0, 50.0))
    with pytest.raises(ConfigError, match="underflows"):
        recall_weights(reps, 2, sigma=1e-6)


@pytest.mark.parametrize("kwargs", [{"sigma": 0.0}, {"sigma": -1.0}, {"temperature": 0.0}, {"temperature": float("nan")}])
def test_bad_parameters(kwargs):
    with pytest.raises(ConfigError):
        recall_weights(_reps(5), 2, **kwargs)
