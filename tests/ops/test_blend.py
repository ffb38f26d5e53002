"""Every blend backend must give the reference's bytes (DESIGN.md "Arithmetic")."""

from __future__ import annotations

import pytest
import torch

from fastmerge.errors import KernelError
from fastmerge.ops import blend
from fastmerge.ops.blend import blend_reference

from op_support import BIG_SIZE, FLOAT_DTYPES, native_threads

# (base?, lam): plain weighted sum, scaled sum, task-vector form.
FORMS = ((False, 1.0), (False, 0.37), (True, 1.0), (True, 0.61))


def _inputs(k, n, dtypes, gen, device="cpu"):
    return [(torch.randn(n, generator=gen) * (i + 1)).to(dtypes[i % len(dtypes)]).to(device) for i in range(k)]


def _weights(k, gen):
    # Irrational-looking doubles: the fp32 rounding of the weights is part of what is checked.
    return (torch.rand(k, generator=gen, dtype=torch.float64) * 2 - 0.5).tolist()


@pytest.mark.parametrize("k", range(1, 9))
def test_matches_reference(backend, device, dtype, size, k, gen, assert_same_bytes):
    xs = _inputs(k, size, [dtype], gen)
    base = torch.randn(size, generator=gen).to(dtype)
    w = _weights(k, gen)
    for with_base, lam in FORMS:
        b = base if with_base else None
        expected = blend_reference(xs, w, base=b, lam=lam)
        actual = blend([x.to(device) for x in xs], w, base=None if b is None else b.to(device), lam=lam, backend=backend)
        assert_same_bytes(actual, expected)


@pytest.mark.parametrize("k", (9, 17))
def test_more_inputs_than_one_launch_group(backend, device, k, gen, assert_same_bytes):
    xs = _inputs(k, 1000, FLOAT_DTYPES, gen)
    base = torch.randn(1000, generator=gen)
    w = _weights(k, gen)
    expected = blend_reference(xs, w, base=base, lam=0.5, out_dtype=torch.bfloat16)
    actual = blend([x.to(device) for x in xs], w, base=base.to(device), lam=0.5, out_dtype=torch.bfloat16, backend=backend)
    assert_same_bytes(actual, expected)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
def test_mixed_input_dtypes_and_fp8(backend, device, out_dtype, gen, assert_same_bytes):
    dtypes = [torch.bfloat16, torch.float8_e4m3fn, torch.float16, torch.float32, torch.float8_e5m2]
    xs = _inputs(5, 4097, dtypes, gen)
    base = torch.randn(4097, generator=gen).to(torch.float16)
    w = _weights(5, gen)
    for b in (None, base):
        expected = blend_reference(xs, w, base=b, lam=0.8, out_dtype=out_dtype)
        actual = blend([x.to(device) for x in xs], w, base=None if b is None else b.to(device), lam=0.8, out_dtype=out_dtype, backend=backend)
        assert_same_bytes(actual, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_big_tensor_native(dtype, gen, assert_same_bytes):
    xs = _inputs(4, BIG_SIZE, [dtype], gen)
    base = torch.randn(BIG_SIZE, generator=gen).to(dtype)
    w = _weights(4, gen)
    expected = blend_reference(xs, w, base=base, lam=0.9)
    assert_same_bytes(blend(xs, w, base=base, lam=0.9, backend="native"), expected)


def test_native_bytes_do_not_depend_on_thread_count(gen, assert_same_bytes):
    xs = _inputs(3, 100_003, [torch.bfloat16, torch.float16, torch.float32], gen)
    w = _weights(3, gen)
    results = []
    for threads in (1, 2, 3, 7):
        with native_threads(threads):
            results.append(blend(xs, w, base=xs[0], lam=0.3, out_dtype=torch.bfloat16, backend="native"))
    for r in results[1:]:
        assert_same_bytes(r, results[0])


def test_fp16_conversions_are_exact_over_every_half_value(backend, device, assert_same_bytes):
    # All 65536 fp16 bit patterns in (NaNs aside), then fp32 values across the fp16 range out,
    # including subnormals, the overflow boundary and infinities.
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halves = halves[~halves.isnan()]
    assert_same_bytes(blend([halves.to(device)], [1.0], out_dtype=torch.float32, backend=backend), blend_reference([halves], [1.0], out_dtype=torch.float32))
    scales = torch.tensor([2.0**-26, 2.0**-20, 2.0**-14, 1.0, 2.0**10, 2.0**16])
    floats = (torch.randn(6, 2000, generator=torch.Generator().manual_seed(0)) * scales[:, None]).reshape(-1)
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 1e6, float("inf"), -float("inf"), 2.0**-25, 3 * 2.0**-26])
    floats = torch.cat([floats, edges])
    assert_same_bytes(blend([floats.to(device)], [1.0], out_dtype=torch.float16, backend=backend), floats.half())


def test_nan_and_inf_propagate(backend, device):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], dtype=torch.bfloat16)
    out = blend([x.to(device), torch.ones(4, dtype=torch.bfloat16, device=device)], [0.5, 0.5], backend=backend).cpu()
    assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf") and out[3] == 1.0


def test_zero_dim_and_empty(backend, device, assert_same_bytes):
    for shape in ((), (0,), (3, 0)):
        xs = [torch.full(shape, 1.5, dtype=torch.bfloat16), torch.full(shape, -0.25, dtype=torch.bfloat16)]
        actual = blend([x.to(device) for x in xs], [0.3, 0.7], base=xs[1].to(device), backend=backend)
        assert_same_bytes(actual, blend_reference(xs, [0.3, 0.7], base=xs[1]))


def test_non_contiguous_inputs_are_read_correctly(backend, device, gen, assert_same_bytes):
    xs = [torch.randn(33, 65, generator=gen).to(torch.bfloat16).t() for _ in range(3)]
    base = torch.randn(65, 33 * 2, generator=gen)[:, ::2]
    assert not xs[0].is_contiguous() and not base.is_contiguous()
    expected = blend_reference([x.contiguous() for x in xs], [0.2, 0.3, 0.5], base=base.contiguous())
    actual = blend([x.to(device) for x in xs], [0.2, 0.3, 0.5], base=base.to(device), out_dtype=torch.bfloat16, backend=backend)
    assert_same_bytes(actual, expected)


def test_out_is_written_in_place_into_a_view(backend, device, gen, assert_same_bytes):
    xs = _inputs(2, 300, [torch.float16], gen)
    buffer = torch.full((1000,), 7.0, dtype=torch.float16, device=device)
    view = buffer[100:400]
    result = blend([x.to(device) for x in xs], [0.5, 0.5], backend=backend, out=view)
    assert result.data_ptr() == view.data_ptr()
    assert_same_bytes(buffer[100:400], blend_reference(xs, [0.5, 0.5]))
    assert (buffer[:100] == 7).all() and (buffer[400:] == 7).all()


def test_bad_arguments_raise_kernel_errors():
    x = torch.zeros(4)
    with pytest.raises(KernelError, match=r"inputs\[2\] has shape \(5,\)"):
        blend([x, x, torch.zeros(5)], [1, 1, 1])
    with pytest.raises(KernelError, match="base has shape"):
        blend([x], [1], base=torch.zeros(3))
    with pytest.raises(KernelError, match="2 inputs but 1 weights"):
        blend([x, x], [1.0])
    with pytest.raises(KernelError, match="at least one input"):
        blend([], [])
    with pytest.raises(KernelError, match="out_dtype"):
        blend([x], [1], out_dtype=torch.float64)
    with pytest.raises(KernelError, match="out has dtype"):
        blend([x], [1], out_dtype=torch.float16, out=torch.empty(4))
    with pytest.raises(KernelError, match="contiguous"):
        blend([torch.zeros(2, 2)], [1], out=torch.empty(2, 2).t())
    with pytest.raises(KernelError, match=r"inputs\[0\] has dtype torch.int32; it must be fp32"):
        blend([torch.zeros(4, dtype=torch.int32)], [1])
    with pytest.raises(KernelError, match="unknown backend"):
        blend([x], [1], backend="fortran")
