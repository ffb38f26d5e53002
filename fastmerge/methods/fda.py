"""FDA: functional dual anchors (METHODS.md "FDA", arXiv 2510.21223).

Task vectors say how the weights moved; FDA asks what inputs would have moved them that way.
For a linear weight W (out x in) with base b and fine-tunes x_i (task vectors d_i = x_i - b),
the anchors of task i are n synthetic inputs X_i (n x in). Fitting b to the fine-tune's outputs
on them, loss 1/2 ||X_i b^T - X_i x_i^T||^2, has the gradient -d_i X_i^T X_i at b, so a step
against it moves b along d_i X_i^T X_i. The anchors are optimised (Adam, `steps` steps) so that
this direction aligns with the task vector:

    maximise  cos(d_i X_i^T X_i, d_i)      (Frobenius cosine over the whole matrix)

starting from n rows sampled from the fine-tuned weight x_i (`anchor_init: weight`) or from
Gaussian noise with std `sigma` (`anchor_init: gaussian`). The cosine is at most
||top-n singular values of d_i|| / ||all of them||, reached when the anchors span the top-n right
singular vectors of d_i; it is what the anchors capture of the task.

The merged weight then starts from W0 (task arithmetic b + lambda sum w_i d_i, or the base)
and is fitted to every fine-tune's outputs on its anchors:

    W = argmin_W  sum_i w_i / n ||X_i (W - x_i)^T||^2 + rho ||W - W0||^2

a quadratic, so it is solved in closed form in fp64 (as METHODS.md asks of quadratic objectives)
instead of by gradient steps: with A the stacked sqrt(w_i / n) X_i and T the stacked
sqrt(w_i / n) X_i (x_i - W0)^T, W = W0 + (A^T (A A^T + rho I)^-1 T)^T, one (K n) x (K n) solve.
rho = `ridge` times the mean diagonal of A A^T; gradient steps from W0 would approach the
rho = 0 solution, and the ridge plays the part of stopping them early.

Anchors are inputs to a linear map, so FDA applies to 2-d weights that act on vectors; every
other tensor (norms, biases, embedding tables, whose inputs are token ids) takes the task
arithmetic merge. Random draws come from a generator seeded by (seed, tensor, model), so the
output is reproducible; the optimisation uses the device's matrix products, so bytes can differ
between devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import ops
from ..errors import ConfigError, PlanError
from ..ops.dot import gram
from ..ops.random import derive_key
from ..values import is_finite_number
from .base import TensorTask, register
from .contract import ContractMethod
from .task_vectors import input_names

ANCHOR_INITS = ("weight", "gaussian")
INIT_MERGES = ("task_arithmetic", "base")
# Relative cut-off for the Gram matrix's eigenvalues at ridge 0 (1e-5 on the anchors' singular values).
PINV_RTOL = 1e-10
# Rows of a matrix the fit holds in fp64 at once (4096 x 11008 fp64 would be 360 MB).
FIT_ROWS = 1024


def is_anchor_target(name: str, tensor: torch.Tensor) -> bool:
    """Whether FDA fits this tensor: a non-empty matrix that is not an embedding table."""
    return tensor.dim() == 2 and tensor.numel() > 0 and "embed" not in name


def thread_independent_sum(values: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Sum of all elements in an order that does not depend on the thread count.

    torch splits a reduction to one scalar between threads (so its rounding changes with their
    number) but a reduction to many outputs only across the outputs, each summed in one order;
    so sum fixed-size chunks, then the chunk sums, until few enough remain for one thread.
    """
    flat = values.reshape(-1)
    while flat.numel() > chunk:
        flat = torch.nn.functional.pad(flat, (0, -flat.numel() % chunk)).reshape(-1, chunk).sum(dim=1)
    return flat.sum()


def squared_norm(matrix: torch.Tensor) -> torch.Tensor:
    """||matrix||^2 in fp64 from the Gram kernel, which reads the matrix once, makes no copy
    and adds in a fixed order whatever the thread count."""
    return gram([matrix])[0, 0, 0]


def alignment_gradient(anchors: torch.Tensor, delta: torch.Tensor, delta_norm: torch.Tensor) -> torch.Tensor:
    """The gradient of cos(delta X^T X, delta) with respect to the anchors X.

    Written out instead of autograd so that no (out x in) product is formed and every sum has a
    fixed order. With Y = D X^T, a = ||Y||^2 = <D X^T X, D>, b = ||Y X||^2 = <Y^T Y, X X^T>:
    cos = a / (sqrt(b) ||D||) and
    d cos / dX = ((2 Y - (a / b) Y X X^T)^T D / sqrt(b) - a / b^1.5 Y^T Y X) / ||D||.
    """
    Y = delta @ anchors.T
    YtY = Y.T @ Y
    C = anchors @ anchors.T
    a = YtY.diagonal().sum()
    b = thread_independent_sum(YtY * C)
    if b <= 0:
        return torch.zeros_like(anchors)
    root = b.sqrt()
    return ((2 * Y - (a / b) * (Y @ C)).T @ delta / root - (a / (b * root)) * (YtY @ anchors)) / delta_norm


def initial_anchors(finetuned: torch.Tensor, count: int, init: str, sigma: float, seed: int) -> torch.Tensor:
    """`count` starting anchors (count x in, fp32): rows of the fine-tuned weight (without
    replacement while there are enough) or N(0, sigma^2) noise, drawn on the CPU so every device
    starts from the same anchors."""
    generator = torch.Generator().manual_seed(seed)
    rows, width = finetuned.shape
    if init == "gaussian":
        return (torch.randn(count, width, generator=generator) * sigma).to(finetuned.device)
    if count <= rows:
        picked = torch.randperm(rows, generator=generator)[:count]
    else:
        picked = torch.randint(rows, (count,), generator=generator)
    return finetuned[picked.to(finetuned.device)].float()


def optimise_anchors(anchors: torch.Tensor, delta: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Adam on 1 - cos(delta X^T X, delta), from `anchors`.

    `lr` is relative to the anchors' starting RMS, because the cosine ignores their overall
    scale while Adam's steps are absolute."""
    delta_norm = squared_norm(delta).sqrt().float()
    if steps == 0 or delta_norm == 0:
        return anchors
    scale = squared_norm(anchors).div(anchors.numel()).sqrt().item() or 1.0
    variable = anchors.clone()
    optimiser = torch.optim.Adam([variable], lr=lr * scale)
    for _ in range(steps):
        variable.grad = -alignment_gradient(variable, delta, delta_norm)
        optimiser.step()
    return variable


def row_blocks(rows: int) -> list[slice]:
    """Slices of FIT_ROWS rows: the fit forms fp64 rows a block at a time, not the whole matrix."""
    return [slice(r, min(r + FIT_ROWS, rows)) for r in range(0, rows, FIT_ROWS)]


def fit_to_anchors(start: torch.Tensor, finetuned: list[torch.Tensor], anchors: list[torch.Tensor],
                   weights: list[float], ridge: float, out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W0 + the ridge-regularised least-squares correction that makes W reproduce each
    fine-tune's outputs on its anchors (module docstring), computed in fp64 and rounded once
    to `out_dtype`."""
    blocks = row_blocks(start.shape[0])
    rows, targets = [], []
    for x, X, w in zip(finetuned, anchors, weights):
        if w == 0:
            continue
        scaled = X.double() * math.sqrt(w / X.shape[0])
        rows.append(scaled)
        targets.append(torch.cat([(x[r].double() - start[r].double()) @ scaled.T for r in blocks]).T)
    if not rows:
        return start.to(out_dtype)
    A, T = torch.cat(rows), torch.cat(targets)
    gram = A @ A.T
    rho = ridge * gram.diagonal().mean()
    if rho > 0:
        gram = gram + rho * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        coefficients = torch.linalg.solve(gram, T)
    else:
        # The anchors come from fp32, so directions below ~1e-5 of the largest are rounding noise.
        coefficients = torch.linalg.pinv(gram, rtol=PINV_RTOL, hermitian=True) @ T
    merged = torch.empty(start.shape, dtype=out_dtype, device=start.device)
    for r in blocks:
        merged[r] = (coefficients[:, r].T @ A).add_(start[r].double())
    return merged


@dataclass(frozen=True)
class FdaSettings:
    """One tensor's validated FDA parameters."""

    weights: list[float]
    lam: float
    init_merge: str
    anchors: int
    steps: int
    lr: float
    anchor_init: str
    sigma: float
    ridge: float

    @classmethod
    def parse(cls, tensor: str, model_params: list[dict[str, Any]], params: dict[str, Any]) -> FdaSettings:
        """Check every parameter, raising a ConfigError that names it and the tensor."""
        return cls(
            weights=[_number(p, "weight", tensor, 0.0) for p in model_params],
            lam=_number(params, "lambda", tensor, -math.inf),
            init_merge=_choice(params, "init_merge", INIT_MERGES, tensor),
            anchors=_number(params, "anchors", tensor, 1, integer=True),
            steps=_number(params, "steps", tensor, 0, integer=True),
            lr=_number(params, "lr", tensor, 0.0, open_minimum=True),
            anchor_init=_choice(params, "anchor_init", ANCHOR_INITS, tensor),
            sigma=_number(params, "sigma", tensor, 0.0, open_minimum=True),
            ridge=_number(params, "ridge", tensor, 0.0),
        )


def _choice(params: dict[str, Any], name: str, allowed: tuple[str, ...], tensor: str) -> str:
    value = params[name]
    if value not in allowed:
        raise ConfigError(f"fda: parameter `{name}` for tensor {tensor} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _number(params: dict[str, Any], name: str, tensor: str, minimum: float, integer: bool = False,
            open_minimum: bool = False) -> float:
    value = params[name]
    valid = is_finite_number(value)
    if valid and integer:
        valid = float(value).is_integer()
    if valid:
        valid = value > minimum if open_minimum else value >= minimum
    if not valid:
        kind = "an integer" if integer else "a number" if math.isfinite(minimum) else "a finite number"
        bound = "" if not math.isfinite(minimum) else f" > {minimum}" if open_minimum else f" >= {minimum}"
        raise ConfigError(f"fda: parameter `{name}` for tensor {tensor} must be {kind}{bound}, got {value!r}")
    return int(value) if integer else float(value)


@register
class FunctionalDualAnchors(ContractMethod):
    """Anchors per task and matrix, then the merged matrix fitted to every fine-tune on them."""

    name = "fda"
    model_params = {"weight": 1.0}
    global_params = {
        "anchors": 32,
        "steps": 100,
        "lr": 0.05,
        "anchor_init": "weight",
        "sigma": 0.01,
        "init_merge": "task_arithmetic",
        "lambda": 1.0,
        "ridge": 0.01,
    }
    requires_base = True
    min_inputs = 0

    def prepare(self, context: Any) -> None:
        """Check every tensor's parameters before the first byte is written."""
        super().prepare(context)
        for tensor in context.plan.tensors:
            if not tensor.copy_only:
                FdaSettings.parse(tensor.name, tensor.params, tensor.global_params)

    def merge(self, task: TensorTask) -> torch.Tensor:
        settings = FdaSettings.parse(task.name, task.params, task.global_params)
        if not task.inputs:
            return task.base.to(task.out_dtype)
        if not is_anchor_target(task.name, task.base):
            return task_arithmetic(task, settings, task.out_dtype)
        require_finite(task)
        anchors = []
        for index, x in enumerate(task.inputs):
            seed = derive_key(task.seed, task.name, index)
            start = initial_anchors(x, settings.anchors, settings.anchor_init, settings.sigma, seed)
            delta = x.to(torch.float32, copy=True).sub_(task.base)  # a copy: x may be the caller's fp32 tensor
            anchors.append(optimise_anchors(start, delta, settings.steps, settings.lr))
        start = task.base if settings.init_merge == "base" else task_arithmetic(task, settings, torch.float32)
        return fit_to_anchors(start, task.inputs, anchors, settings.weights, settings.ridge, task.out_dtype)


def require_finite(task: TensorTask) -> None:
    """Refuse NaN or inf in an anchor target's inputs or base, naming the tensor and the model:
    they would reach the Gram matrix of the fit, whose eigen-solver then fails to converge with
    a message that names neither."""
    for name, tensor in [*zip(input_names(task), task.inputs), ("the base model", task.base)]:
        if not bool(torch.isfinite(tensor).all()):
            raise PlanError(f"fda: tensor {task.name} of {name} holds NaN or inf; FDA fits finite weights only")


def task_arithmetic(task: TensorTask, settings: FdaSettings, out_dtype: torch.dtype) -> torch.Tensor:
    """b + lambda sum_i w_i d_i on the blend kernel: the output for tensors without anchors and
    the fit's fp32 start under `init_merge: task_arithmetic`."""
    return ops.blend(task.inputs, settings.weights, base=task.base, lam=settings.lam, out_dtype=out_dtype,
                     backend=task.backend)
