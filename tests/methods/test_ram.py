"""ram and ramplus_tl against their rules written element by element."""

from __future__ import annotations

import pytest
import torch

from fastmerge import merge_tensors


def sparse_fine_tunes(count, shape, seed):
    """Models that each change a random subset of the base, so unique and shared changes mix."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    models = []
    for _ in range(count):
        keep = torch.rand(*shape, generator=g) < 0.4
        models.append(base + keep * torch.randn(*shape, generator=g))
    return base, models


def ram_formula(base, models, epsilon=1e-5, r=None, alpha=None):
    b = base.double().flatten()
    deltas = [m.float().flatten().double() - b for m in models]
    changes = [d.abs() > epsilon for d in deltas]
    counts = sum(c.long() for c in changes)
    lambdas = [1.0] * len(models)
    if r is not None:
        for i, c in enumerate(changes):
            shared = int((c & (counts > 1)).sum())
            unique = int((c & (counts == 1)).sum())
            lambdas[i] = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
    out = b.clone()
    for j in range(b.numel()):
        contributors = [i for i in range(len(models)) if changes[i][j]]
        if len(contributors) == 1:
            out[j] += lambdas[contributors[0]] * deltas[contributors[0]][j]
        elif contributors:
            out[j] += sum(deltas[i][j] for i in contributors) / len(contributors)
    return out.reshape(base.shape)


@pytest.mark.parametrize("count", [2, 3])
def test_ram_matches_rule(count):
    base, models = sparse_fine_tunes(count, (7, 9), seed=count)
    out = merge_tensors("ram", models, base=base)
    assert (out.double() - ram_formula(base, models)).abs().max() <= 1e-6


def test_ramplus_tl_matches_rule():
    base, models = sparse_fine_tunes(3, (8, 10), seed=7)
    out = merge_tensors("ramplus_tl", models, base=base, r=0.5, alpha=0.3)
    expected = ram_formula(base, models, r=0.5, alpha=0.3)
    assert (out.double() - expected).abs().max() <= 1e-6
    assert not torch.allclose(out, merge_tensors("ram", models, base=base))


def test_ram_epsilon_ignores_small_changes():
    base = torch.zeros(4)
    model = torch.tensor([1e-6, 1.0, -2e-6, 0.5])
    out = merge_tensors("ram", [model], base=base, epsilon=1e-5)
    assert torch.equal(out, torch.tensor([0.0, 1.0, 0.0, 0.5]))
