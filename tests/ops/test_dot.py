"""ops.dot.gram: the native kernel within the documented tolerance of the reference, both
against a full-precision oracle, results independent of the thread count, errors named."""

from __future__ import annotations

import math

import pytest
import torch

from fastmerge.errors import KernelError
from fastmerge.ops import dot
from fastmerge.ops._dispatch import available_backends

from op_support import native_threads

BACKENDS = tuple(b for b in dot.SUPPORTED_BACKENDS if b in available_backends())
# (shape, dim): whole tensors, rows, columns, a middle dimension, vectors past one native block
# (4096) and one reference block (small BLOCK_ELEMENTS below), empty fibres.
CASES = (
    ((7,), None),
    ((3 * 4096 + 5,), None),
    ((9, 1000), None),
    ((9, 1000), -1),
    ((9, 1000), 0),
    ((2, 5, 700), 1),
    ((5,), -1),
    ((4, 0), -1),
    ((0, 3), -1),
)


def oracle(vectors, base, dim):
    """The definition with full fp64 copies (fine for test sizes)."""
    rows = []
    for v in vectors:
        task = v.float() - base.float() if base is not None else v.float()
        moved = task.double().reshape(1, -1) if dim is None or v.ndim <= 1 else task.double().movedim(dim, -1)
        rows.append(moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1]))
    stacked = torch.stack(rows)
    return torch.einsum("ird,jrd->ijr", stacked, stacked)


def assert_within_tolerance(actual, expected):
    n = torch.diagonal(expected, dim1=0, dim2=1).T.clamp(min=0).sqrt()  # [K, R]
    bound = dot.GRAM_TOLERANCE * n[:, None, :] * n[None, :, :] + 1e-300
    assert actual.shape == expected.shape and actual.dtype == torch.float64
    assert ((actual - expected).abs() <= bound).all(), (actual - expected).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("with_base", (False, True), ids=("plain", "task"))
def test_gram_matches_oracle(backend, case, dtype, with_base, monkeypatch):
    monkeypatch.setattr(dot, "BLOCK_ELEMENTS", 1000)  # several reference blocks per tensor
    shape, dim = case
    gen = torch.Generator().manual_seed(len(shape) * 100 + (dim or 7))
    # An offset from the base gives the task vectors real cancellation, as fine-tunes do.
    base = (torch.randn(shape, generator=gen) + 2).to(dtype)
    vectors = [(base.float() + 0.01 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(3)]
    used_base = base if with_base else None
    assert_within_tolerance(dot.gram(vectors, base=used_base, dim=dim, backend=backend), oracle(vectors, used_base, dim))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_single_vector(backend):
    x = torch.arange(-6, 6, dtype=torch.float32).reshape(3, 4)
    g = dot.gram([x.to(torch.bfloat16), x], base=torch.ones(3, 4, dtype=torch.float16), dim=-1, backend=backend)
    expected = ((x - 1) ** 2).sum(-1).double()
    for i in range(2):
        for j in range(2):
            assert torch.equal(g[i, j], expected)
    assert torch.equal(dot.gram([x], backend=backend), torch.tensor([[[float((x * x).sum())]]], dtype=torch.float64))


@pytest.mark.skipif("native" not in BACKENDS, reason="native extension not built")
@pytest.mark.parametrize("dim", (None, -1, 0), ids=str)
def test_native_result_does_not_depend_on_thread_count(dim):
    gen = torch.Generator().manual_seed(5)
    vectors = [torch.randn(64, 9000, generator=gen).to(torch.bfloat16) for _ in range(4)]
    results = []
    for threads in (1, 2, 3):
        with native_threads(threads):
            results.append(dot.gram(vectors, base=vectors[0], dim=dim, backend="native"))
    assert all(torch.equal(r.view(torch.int64), results[0].view(torch.int64)) for r in results)


def test_bad_inputs_name_the_problem():
    x = torch.zeros(3, 4)
    with pytest.raises(KernelError, match=r"vectors\[1\] has shape"):
        dot.gram([x, torch.zeros(4, 3)])
    with pytest.raises(KernelError, match="base has dtype torch.int64"):
        dot.gram([x], base=torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(KernelError, match="dim=2 is out of range"):
        dot.gram([x], dim=2)
    with pytest.raises(KernelError, match="at least one"):
        dot.gram([])
    with pytest.raises(KernelError, match="no 'triton' backend"):
        dot.gram([x], backend="triton")
