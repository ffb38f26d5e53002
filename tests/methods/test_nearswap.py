"""nearswap against its element-wise rule."""

from __future__ import annotations

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError


def test_nearswap_matches_rule():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20, 30, generator=g)
    model = base + 0.05 * torch.randn(20, 30, generator=g)
    t = 0.02
    out = merge_tensors("nearswap", [model], base=base, t=t)
    b, x = base.double(), model.double()
    w = (t / (b - x).abs().clamp(min=1e-6)).clamp(0, 1)
    expected = w * x + (1 - w) * b
    assert (out.double() - expected).abs().max() <= 1e-6
    near = (b - x).abs() <= t
    assert torch.allclose(out[near], model[near])  # close elements are swapped in outright


def test_nearswap_needs_t():
    with pytest.raises(ConfigError, match="`t`"):
        merge_tensors("nearswap", [torch.ones(3)], base=torch.zeros(3))
