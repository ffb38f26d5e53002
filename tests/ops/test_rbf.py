"""rbf_similarity: every backend within the documented tolerance of the fp64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from fastmerge.errors import KernelError
from fastmerge.ops import rbf_similarity
from fastmerge.ops.rbf import D_TOLERANCE, squared_distances


@pytest.mark.parametrize("shape", ((1, 1, 1, 1), (1, 7, 5, 33), (3, 9, 4, 300), (2, 0, 3, 8), (2, 3, 3, 0)), ids=str)
def test_distances_and_kernel_match_reference(backend, device, dtype, shape, gen):
    L, n, m, d = shape
    # An offset makes ||x||^2 large against the distances: the cancellation the fp64 form guards.
    X = (torch.randn(L, n, d, generator=gen) + 3).to(dtype)
    Y = (torch.randn(L, m, d, generator=gen) + 3).to(dtype)
    D_ref = squared_distances(X, Y)
    D = squared_distances(X.to(device), Y.to(device), backend).cpu()
    scale = (X.double() ** 2).sum(-1)[:, :, None] + (Y.double() ** 2).sum(-1)[:, None, :]
    assert (D >= 0).all() and ((D - D_ref).abs() <= D_TOLERANCE * scale + 1e-300).all()
    K_ref, s_ref = rbf_similarity(X, Y, backend="reference")
    K, s = rbf_similarity(X.to(device), Y.to(device), backend=backend)
    assert K.dtype == torch.float32 and K.shape == (L, n, m) and s.shape == (L,)
    torch.testing.assert_close(K.cpu(), K_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.cpu(), s_ref, atol=0, rtol=1e-9)


def test_nan_and_inf_rows_give_nan_distances_as_in_the_reference(backend, device):
    """The native kernel's clamp at 0 turned NaN into 0 (a broken model looked identical to the
    new one in RECALL); every backend keeps NaN where the reference does."""
    X = torch.ones(1, 3, 8, dtype=torch.float64)
    X[0, 1, 2], X[0, 2, 5] = float("nan"), float("inf")
    Y = torch.zeros(1, 2, 8, dtype=torch.float64)
    D_ref = squared_distances(X, Y)
    D = squared_distances(X.to(device), Y.to(device), backend).cpu()
    assert torch.equal(D.isnan(), D_ref.isnan()) and D_ref[0, 1:].isnan().all() and not D_ref[0, 0].isnan().any()
    assert torch.equal(D[0, 0], D_ref[0, 0])


def test_median_heuristic_definition():
    # Distances 1, 4, 9 and 16 (and one zero pair): lower median of the non-zero ones is 4.
    X = torch.tensor([[0.0], [1.0]])
    Y = torch.tensor([[1.0], [3.0], [-3.0]])  # D = [[1, 9, 9], [0, 4, 16]]
    K, sigma = rbf_similarity(X, Y, backend="reference")
    assert sigma.dim() == 0 and sigma.item() == pytest.approx(math.sqrt(9 / 2))
    assert K[1, 0].item() == 1.0 and K[0, 0].item() == pytest.approx(math.exp(-1 / 9))
    _, sigma_all_equal = rbf_similarity(torch.ones(2, 3), torch.ones(4, 3))
    assert sigma_all_equal.item() == 1.0


def test_explicit_sigma_float_and_per_layer(backend, device, gen):
    X, Y = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    K, s = rbf_similarity(X.to(device), Y.to(device), sigma=2.0, backend=backend)
    assert s.tolist() == [2.0, 2.0]
    D = squared_distances(X, Y)
    torch.testing.assert_close(K.cpu(), torch.exp(-D / 8.0).float(), atol=1e-6, rtol=0)
    K2, s2 = rbf_similarity(X.to(device), Y.to(device), sigma=torch.tensor([1.0, 3.0]), backend=backend)
    torch.testing.assert_close(K2[1].cpu(), torch.exp(-D[1] / 18.0).float(), atol=1e-6, rtol=0)


def test_bad_inputs_raise_kernel_errors():
    with pytest.raises(KernelError, match=r"X \(3, 4\) and Y \(3, 5\)"):
        rbf_similarity(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(KernelError, match="must both be"):
        rbf_similarity(torch.zeros(3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(KernelError, match="layer count"):
        rbf_similarity(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))
    with pytest.raises(KernelError, match="2 values but there are 3 layers"):
        rbf_similarity(torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), sigma=torch.ones(2))
    with pytest.raises(KernelError, match="positive"):
        rbf_similarity(torch.zeros(2, 4), torch.zeros(2, 4), sigma=0.0)
