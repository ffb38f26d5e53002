"""GPU kernel figures against the kernels issue's GPU targets, all measured in one run.

    copy        torch device-to-device copy: the HBM bandwidth every other figure is a share of
    blend       4 bf16 inputs of N elements -> bf16 (target: >= 80% of the copy's bandwidth)
    threshold   the exact k-th largest |x - base| of one input (density 0.2)
    ties        base + 4 inputs, density 0.2, thresholds included (target: >= 50%)
    dare_ties   base + 4 inputs, density 0.2, Philox draws and the L1 rescale
    rbf         RECALL's similarity, X [L, n, d] against Y [L, m, d], in TFLOP/s (2 L n m d
                flops) beside torch.cdist + exp on the same inputs

A kernel's bandwidth counts the bytes it must move at least: one read of its inputs and one
write of its output, over the median of `--repeat` timed calls (CUDA events) after an untimed
one that compiles the Triton kernels. Every kernel is checked against the reference backend on
the first `--check-n` elements of the same inputs (the same bytes; the RBF within its
documented 1e-6; 4M by default, since the reference's numpy Philox draws take about 3 s per
10M), and the run says which
backend each op took: the threshold runs on the CUDA histogram kernel only in a build with
FASTMERGE_CUDA=ON, else on the torch reference.

Run on a GPU box: python -m bench.gpu_kernels [--n 67108864] [--json gpu_kernels.json]
`--device cpu` runs the same code on CPU tensors with the Triton kernels in the interpreter
(TRITON_INTERPRET=1), for small sizes only: a check of this script, whose timings mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from fastmerge.ops import blend, magnitude_threshold, rbf_similarity, ties_merge
from fastmerge.ops.threshold import threshold_backend

from .kernels.bench_ties import DENSITY, K, WEIGHTS, make_inputs

BF16 = 2  # bytes per element
TARGETS = {"blend": 0.8, "ties": 0.5}  # share of the copy's bandwidth, from the kernels issue
RBF_TOLERANCE = 1e-6


@dataclass
class KernelFigure:
    name: str
    backend: str
    seconds: float
    bytes: int
    gbps: float
    share_of_copy: float | None
    target: float | None
    met: bool | None
    matches_reference: bool


@dataclass
class RbfFigure:
    shape: list[int]  # L, n, m, d
    seconds: float
    tflops: float
    torch_seconds: float
    torch_tflops: float
    speedup_vs_torch: float
    max_abs_diff: float
    matches_reference: bool


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median wall time of `repeat` calls after one untimed call (Triton compiles on the first)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_figure(name: str, backend: str, seconds: float, nbytes: int, copy_gbps: float | None,
                  matches: bool) -> KernelFigure:
    gbps = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
    share = gbps / copy_gbps if copy_gbps else None
    target = TARGETS.get(name)
    met = None if target is None or share is None else share >= target
    return KernelFigure(name, backend, seconds, nbytes, gbps, share, target, met, matches)


def measure_copy(xs: list[torch.Tensor], device: torch.device, repeat: int) -> KernelFigure:
    """A device-to-device copy of the inputs' bytes: the bandwidth the kernels are held to."""
    src = torch.cat(xs)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeat)
    return kernel_figure("copy", "torch", seconds, 2 * src.numel() * BF16, None, torch.equal(dst, src))


def _threshold(base, xs, backend):
    found = magnitude_threshold(xs[0], int(DENSITY * base.numel()), base=base, backend=backend)
    return found.value, found.ties_to_keep


def _ties(base, xs, backend):
    return ties_merge(base, xs, WEIGHTS, densities=[DENSITY] * K, backend=backend)


def _dare_ties(base, xs, backend):
    return ties_merge(base, xs, WEIGHTS, densities=[DENSITY] * K, sparsify="random", rescale=True, normalize=False,
                      seed=1, tensor_name="bench", backend=backend)


def _blend(base, xs, backend):
    return blend(xs, WEIGHTS, backend=backend)


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def measure_kernels(n: int, device: torch.device, repeat: int, check_n: int) -> list[KernelFigure]:
    """copy, blend, threshold, ties and dare_ties on one set of inputs (module docstring). The
    element passes run on Triton, as a merge on a GPU runs them; the selection on the backend
    such a merge gives it (`threshold_backend`). Each kernel is checked against the reference
    on the inputs' first `check_n` elements (the reference's Philox draws run in numpy, about
    3 s per 10M)."""
    base, xs = make_inputs(n, device)
    selection = threshold_backend(device, "triton")
    copy = measure_copy(xs, device, repeat)
    figures = [copy]
    kernels = [  # name, backend, bytes moved per element, op(base, inputs, backend)
        ("blend", "triton", K + 1, _blend),
        ("threshold", selection, 2, _threshold),
        ("ties", "triton", K + 2, _ties),
        ("dare_ties", "triton", K + 2, _dare_ties),
    ]
    prefix = base[:check_n], [x[:check_n] for x in xs]
    for name, backend, per_element, op in kernels:
        seconds = median_seconds(functools.partial(op, base, xs, backend), device, repeat)
        same = _same(op(*prefix, backend), op(*prefix, "reference"))
        label = backend if name in ("blend", "threshold") else f"triton, {selection} selection"
        figures.append(kernel_figure(name, label, seconds, per_element * n * BF16, copy.gbps, same))
    return figures


def measure_rbf(shape: list[int], device: torch.device, repeat: int) -> RbfFigure:
    """fastmerge's RBF similarity against torch.cdist + exp on the same fp32 inputs and sigma."""
    L, n, m, d = shape
    gen = torch.Generator(device=device).manual_seed(1)
    X = torch.randn(L, n, d, generator=gen, device=device) / d**0.5  # distances of order 1
    Y = torch.randn(L, m, d, generator=gen, device=device) / d**0.5
    sigma = 1.0

    def torch_rbf():
        return torch.exp(-torch.cdist(X, Y) ** 2 / (2 * sigma**2))

    seconds = median_seconds(lambda: rbf_similarity(X, Y, sigma=sigma, backend="triton"), device, repeat)
    torch_seconds = median_seconds(torch_rbf, device, repeat)
    K_ours, _ = rbf_similarity(X, Y, sigma=sigma, backend="triton")
    K_ref, _ = rbf_similarity(X, Y, sigma=sigma, backend="reference")
    diff = float((K_ours - K_ref).abs().max()) if K_ours.numel() else 0.0
    flops = 2 * L * n * m * d
    return RbfFigure(shape, seconds, flops / seconds / 1e12, torch_seconds, flops / torch_seconds / 1e12,
                     torch_seconds / seconds, diff, diff <= RBF_TOLERANCE)


def report(kernels: list[KernelFigure], rbf: RbfFigure, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    lines = [f"device: {name}", "",
             "| kernel | backend | time | GB/s | share of copy | target | bytes = reference |",
             "|---|---|---|---|---|---|---|"]
    for f in kernels:
        share = "-" if f.share_of_copy is None else f"{f.share_of_copy:.2f}"
        target = "-" if f.target is None else f">= {f.target:.2f} {'met' if f.met else 'MISSED'}"
        lines.append(f"| {f.name} | {f.backend} | {f.seconds * 1e3:.3f} ms | {f.gbps:.1f} | {share} | {target} | "
                     f"{'yes' if f.matches_reference else 'NO'} |")
    lines += ["", f"rbf {tuple(rbf.shape)} (L, n, m, d): {rbf.tflops:.2f} TFLOP/s ({rbf.seconds * 1e3:.3f} ms); "
                  f"torch.cdist + exp {rbf.torch_tflops:.2f} TFLOP/s ({rbf.torch_seconds * 1e3:.3f} ms): "
                  f"{rbf.speedup_vs_torch:.2f}x; max |K - reference| {rbf.max_abs_diff:.1e}"
                  f" ({'within' if rbf.matches_reference else 'OUTSIDE'} {RBF_TOLERANCE:g})"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (the figures) or cpu (a check of this script under the Triton interpreter)")
    parser.add_argument("--n", type=int, default=64 * 1024 * 1024, help="elements per input [64M]")
    parser.add_argument("--rbf", default="32,1024,1024,4096", help="RBF problem L,n,m,d [32,1024,1024,4096]")
    parser.add_argument("--check-n", type=int, default=1 << 22,
                        help="elements of each input the reference check runs on [4M]")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per kernel; the median is reported [5]")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        args.rbf = [int(v) for v in args.rbf.split(",")]
    except ValueError:
        parser.error(f"--rbf takes four integers L,n,m,d, got {args.rbf!r}")
    if len(args.rbf) != 4 or min(args.rbf) < 1 or min(args.n, args.check_n, args.repeat) < 1:
        parser.error("--n, --check-n, --repeat and the four --rbf sizes must be positive (--rbf takes L,n,m,d)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    elif not torch.cuda.is_available():
        print("no CUDA device here; --device cpu checks this script under the Triton interpreter", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    kernels = measure_kernels(args.n, device, args.repeat, args.check_n)
    rbf = measure_rbf(args.rbf, device, args.repeat)
    print(report(kernels, rbf, device))
    if args.json:
        figures = {"device": str(device), "n": args.n, "check_n": args.check_n,
                   "kernels": [asdict(f) for f in kernels], "rbf": asdict(rbf)}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
