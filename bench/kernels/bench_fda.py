"""FDA anchor optimisation: the written-out gradient vs torch autograd of the same cosine.

One fine-tune's task vector of a Llama-7B MLP shape (FASTMERGE_BENCH_FDA_SHAPE, default
"4096,11008"; "1024,2816" for a quick run), 32 anchors, 10 Adam steps each. autograd forms
delta X^T X (out x in) every step and back-propagates through it; fastmerge's
`optimise_anchors` works with (out x n) and (n x n) products only. Both record GFLOP/s over the
4 out in n FLOP per step of the two matrix products that any step needs, and the fastmerge run
its speed-up over autograd measured in the same run (the autograd test runs first).
Correctness is tests/methods/test_fda.py.

Run: python -m pytest bench/kernels/bench_fda.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest
import torch

from fastmerge.methods.fda import initial_anchors, optimise_anchors

OUT, IN = (int(v) for v in os.environ.get("FASTMERGE_BENCH_FDA_SHAPE", "4096,11008").split(","))
ANCHORS, STEPS, LR = 32, 10, 0.05
FLOP = 4 * OUT * IN * ANCHORS * STEPS
_best_seconds: dict[str, float] = {}


@pytest.fixture(scope="module")
def task():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(OUT, IN, generator=gen) * 0.02
    delta = torch.randn(OUT, IN, generator=gen) * 1e-3
    return delta, initial_anchors(base + delta, ANCHORS, "weight", 0.01, seed=1)


def _record(benchmark, name: str) -> None:
    best = benchmark.stats.stats.min
    _best_seconds[name] = best
    benchmark.extra_info["GFLOP/s"] = round(FLOP / best / 1e9, 1)


def test_fda_anchors_autograd(benchmark, task):
    delta, start = task

    def autograd_steps():
        anchors = start.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([anchors], lr=LR * float(start.pow(2).mean().sqrt()))
        for _ in range(STEPS):
            optimiser.zero_grad()
            moved = (delta @ anchors.T) @ anchors
            (1 - (moved * delta).sum() / (moved.norm() * delta.norm())).backward()
            optimiser.step()
        return anchors.detach()

    benchmark.pedantic(autograd_steps, rounds=3, warmup_rounds=1)
    _record(benchmark, "autograd")


def test_fda_anchors_fastmerge(benchmark, task):
    delta, start = task
    benchmark.pedantic(lambda: optimise_anchors(start, delta, STEPS, LR), rounds=3, warmup_rounds=1)
    _record(benchmark, "fastmerge")
    if "autograd" in _best_seconds:
        benchmark.extra_info["speedup_vs_autograd"] = round(_best_seconds["autograd"] / _best_seconds["fastmerge"], 2)
