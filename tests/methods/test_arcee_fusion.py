"""arcee_fusion against its importance/threshold rule written with a full sort."""

from __future__ import annotations

import torch

from fastmerge import merge_tensors


def arcee_fusion_formula(base, model):
    b, x = base.double(), model.double()
    p = torch.softmax(x, -1) + 1e-8
    q = torch.softmax(b, -1) + 1e-8
    scores = (x - b).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    ordered = scores.flatten().sort().values
    last = ordered.numel() - 1
    q1, median, q3 = (ordered[int(f * last)] for f in (0.25, 0.5, 0.75))
    return torch.where(scores >= median + 1.5 * (q3 - q1), x, b)


def test_arcee_fusion_matches_rule():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, 40, generator=g)
    model = base + 0.3 * torch.randn(24, 40, generator=g) * torch.rand(24, 1, generator=g)
    out = merge_tensors("arcee_fusion", [model], base=base)
    expected = arcee_fusion_formula(base, model)
    changed = expected != base.double()
    assert 0 < int(changed.sum()) < changed.numel()  # the rule keeps some changes, not all
    assert (out.double() - expected).abs().max() <= 1e-6


def test_arcee_fusion_on_vectors():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(101, generator=g)
    model = base + torch.randn(101, generator=g) ** 3
    out = merge_tensors("arcee_fusion", [model], base=base)
    assert (out.double() - arcee_fusion_formula(base, model)).abs().max() <= 1e-6
