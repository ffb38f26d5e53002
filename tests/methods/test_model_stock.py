"""model_stock against the Model Stock formula, whole-tensor and filter_wise."""

from __future__ import annotations

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def model_stock_formula(base, models):
    """t = N c / (1 + (N-1) c), c the mean pairwise cosine of the task vectors (fp64)."""
    b = base.double().flatten()
    deltas = [m.double().flatten() - b for m in models]
    cosines = [
        (deltas[i] @ deltas[j]) / (deltas[i].norm() * deltas[j].norm())
        for i in range(len(deltas))
        for j in range(i + 1, len(deltas))
    ]
    c = sum(cosines) / len(cosines)
    n = len(models)
    t = n * c / (1 + (n - 1) * c)
    average = sum(m.double().flatten() for m in models) / n
    return (t * average + (1 - t) * b).reshape(base.shape)


def correlated(base, count, seed):
    """Fine-tunes sharing a common direction, so the cosines are clearly positive."""
    common = rand(*base.shape, seed=seed)
    return [base + 0.1 * common + 0.1 * rand(*base.shape, seed=seed + 1 + i) for i in range(count)]


@pytest.mark.parametrize("count", [2, 4])
def test_model_stock_matches_formula(count):
    base = rand(10, 12, seed=1)
    models = correlated(base, count, seed=10)
    expected = model_stock_formula(base, models)
    out = merge_tensors("model_stock", models, base=base)
    assert (out.double() - expected).abs().max() <= 2e-6 * expected.abs().max()


def test_model_stock_filter_wise_is_per_row():
    base = rand(6, 16, seed=2)
    models = correlated(base, 3, seed=20)
    out = merge_tensors("model_stock", models, base=base, filter_wise=True)
    expected = torch.stack([model_stock_formula(base[r], [m[r] for m in models]) for r in range(6)])
    assert (out.double() - expected).abs().max() <= 2e-6 * expected.abs().max()
    assert not torch.allclose(out, merge_tensors("model_stock", models, base=base), atol=1e-6)


def test_model_stock_singular_ratio_keeps_the_base():
    base, d = rand(8, seed=3), rand(8, seed=4)
    # Two opposite task vectors: c = -1, 1 + (N-1) c = 0, so t = 0 and the output is the base.
    assert torch.equal(merge_tensors("model_stock", [base + d, base - d], base=base), base)


def test_model_stock_needs_two_models_and_a_base():
    base = rand(4, seed=5)
    with pytest.raises(ConfigError, match="at least 2"):
        merge_tensors("model_stock", [base + 1], base=base)
    with pytest.raises(ConfigError, match="base"):
        merge_tensors("model_stock", [base + 1, base - 1])
