"""The Triton kernels as a GPU launches them, checked on a machine without one.

The other op tests run the Triton kernels in the interpreter with the interpreter's launch sizes
(one big block per kernel). A GPU launches them differently (`_common.sized_for_gpu`:
1024-element blocks, 256-lane programs for DARE's L1 sums, 64-wide feature slices for RBF) and
compiles them with Triton's compiler, which rejects code the interpreter runs happily. So here

1. every op runs through the triton backend with the GPU's launch sizes (interpreted, on CPU
   tensors) and must give the reference's bytes (RBF: its tolerance);
2. every launch those runs made, with its argument types, constexprs and options, is compiled
   ahead of time for sm_80 and sm_90 (A100, H100/H200) down to a cubin by Triton's compiler and
   the ptxas it ships, in a fresh interpreter without TRITON_INTERPRET, and must compile;
3. those launches cover every kernel of fastmerge.ops.triton_kernels, all without fp fusion.

What stays unchecked without a GPU: that the compiled code gives those bytes (on a GPU the op
tests run it, and this module skips).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import subprocess
import sys

import pytest
import torch

from fastmerge.ops import apply_mask, blend, pack_mask, rbf_similarity, ties_merge
from fastmerge.ops.random import uniform_draws

from op_support import TRITON_UNTESTABLE

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                       reason="runs the Triton kernels in the interpreter (on a GPU the op tests run them compiled)"),
    pytest.mark.skipif(bool(TRITON_UNTESTABLE), reason=TRITON_UNTESTABLE),
]

ARCHS = (80, 90)

# Compiles each launch read from stdin for each architecture; prints one line per failure.
COMPILER = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def tuples(value):
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value

archs, launches = json.load(sys.stdin)
for launch in launches:
    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    signature = {name: tuples(kind) for name, kind in launch["signature"].items()}
    constexprs = {name: tuples(value) for name, value in launch["constexprs"].items()}
    for arch in archs:
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                      target=GPUTarget("cuda", arch, 32), options=launch["options"])
            assert compiled.asm["cubin"], "no cubin"
        except Exception as exc:
            print(f"{launch['kernel']} {constexprs} sm_{arch}: {type(exc).__name__}: {exc}".replace("\n", " | "))
"""


def _cases():
    """(name, run) pairs; run(backend) returns the op's result on that backend."""
    gen = torch.Generator().manual_seed(11)

    def randn(n, dtype, scale=1.0):
        return (torch.randn(n, generator=gen) * scale).to(dtype)

    n, big = 3001, 70_001  # 3 blocks, the last partial; more than one 65536-lane row of L1 sums
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        xs = [randn(n, dtype) for _ in range(10)]
        cases.append((f"blend-3-{dtype}", lambda b, xs=xs: blend(xs[:3], [0.2, 0.3, 0.5], backend=b)))
        # Nine inputs: two launches (groups of 8), the accumulator carried between them.
        cases.append((f"blend-9-base-{dtype}",
                      lambda b, xs=xs: blend(xs[1:], [0.1] * 9, base=xs[0], lam=0.7, backend=b)))
    base = randn(big, torch.bfloat16)
    fts = [(base.float() + randn(big, torch.float32, 0.01 * (i + 1))).to(torch.bfloat16) for i in range(3)]
    variants = {
        "task_arithmetic": dict(consensus=False, normalize=False),
        "ties": dict(densities=[0.5, 0.3, 0.7]),
        "dare_ties": dict(densities=[0.5, 0.3, 0.7], sparsify="random", normalize=False, rescale=True),
        "breadcrumbs_ties": dict(densities=[0.5, 0.3, 0.7], sparsify="magnitude_outliers", gamma=0.05),
        "della": dict(densities=[0.5, 0.3, 0.7], sparsify="della", normalize=False),
    }
    for variant, kw in variants.items():
        # DARE's L1 sums (256 interpreted programs per model) do not depend on the output dtype,
        # which the other variants cover.
        out_dtypes = (torch.bfloat16,) if variant == "dare_ties" else (torch.bfloat16, torch.float16, torch.float32)
        for out_dtype in out_dtypes:
            cases.append((f"{variant}-{out_dtype}", lambda b, kw=kw, o=out_dtype: ties_merge(
                base, fts, [0.5, 0.3, 0.2], lam=0.9, out_dtype=o, seed=3, tensor_name="w", backend=b, **kw)))
    x, keep = randn(n, torch.float16), torch.rand(n, generator=gen) < 0.4
    cases.append(("apply_mask-dense", lambda b: apply_mask(x, keep, 1.5, backend=b)))
    cases.append(("apply_mask-packed", lambda b: apply_mask(x, pack_mask(keep), 1.5, backend=b)))
    cases.append(("uniform_draws", lambda b: uniform_draws(0x9E3779B97F4A7C15, n, offset=5, backend=b)))
    X, Y = torch.randn(2, 5, 150, generator=gen), torch.randn(2, 6, 150, generator=gen)
    cases.append(("rbf", lambda b: rbf_similarity(X, Y, backend=b)[0]))
    return cases


CASES = _cases()


def _all_kernels() -> set[tuple[str, str]]:
    """(module, name) of every Triton kernel in fastmerge.ops.triton_kernels: the `_kernel`
    functions a launch starts (the other jitted functions are helpers they call)."""
    from triton.runtime.interpreter import InterpretedFunction

    import fastmerge.ops.triton_kernels as package

    found = set()
    for module_info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if isinstance(value, InterpretedFunction) and name.endswith("_kernel") and value.fn.__module__ == module.__name__:
                found.add((module.__name__, name))
    return found


@pytest.fixture(scope="module")
def gpu_sized_runs():
    """Each case's triton result with the GPU's launch sizes, and every launch that made."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import mangle_type

    from fastmerge.ops.triton_kernels import _common

    def kind(arg):
        return tuple(mangle_type(a) for a in arg) if isinstance(arg, tuple) else mangle_type(arg)

    launches = {}
    interpret = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        constexprs = {k: v for k, v in kwargs.items() if k in self.arg_names}
        signature = {name: kind(arg) for name, arg in zip(self.arg_names, args)} | dict.fromkeys(constexprs, "constexpr")
        launch = dict(module=self.fn.__module__, kernel=self.fn.__name__, signature=signature, constexprs=constexprs,
                      options={k: v for k, v in kwargs.items() if k not in constexprs})
        launches[json.dumps(launch, sort_keys=True)] = launch
        return interpret(self, *args, grid=grid, warmup=warmup, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_common, "sized_for_gpu", lambda device: True)
        mp.setattr(InterpretedFunction, "run", recording_run)
        results = {name: run("triton") for name, run in CASES}
    return results, list(launches.values())


@pytest.mark.parametrize("name, run", CASES, ids=[name for name, _ in CASES])
def test_gpu_sized_launches_give_the_reference_bytes(gpu_sized_runs, name, run, assert_same_bytes):
    results, _ = gpu_sized_runs
    if name == "rbf":  # a different summation order: the op's tolerance, as in test_rbf.py
        torch.testing.assert_close(results[name], run("reference"), atol=1e-6, rtol=0)
    else:
        assert_same_bytes(results[name], run("reference"))


def test_the_cases_launch_every_kernel_without_fp_fusion(gpu_sized_runs):
    _, launches = gpu_sized_runs
    assert {(launch["module"], launch["kernel"]) for launch in launches} == _all_kernels()
    assert all(launch["options"] == {"enable_fp_fusion": False} for launch in launches)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs Triton's NVIDIA backend (and the ptxas it ships)")
def test_every_gpu_launch_compiles_for_a100_and_h100(gpu_sized_runs):
    _, launches = gpu_sized_runs
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILER], input=json.dumps([ARCHS, launches]), env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "", f"{len(launches)} launches, failures:\n{done.stdout}"
