"""The TIES family: ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
della_linear (mergekit's generalized task arithmetic) and sce.

The seven generalized-task-arithmetic methods differ only in their sparsifier, whether they
elect a sign, and their defaults (METHODS.md), so they are one class parameterised by those
three things, all running the fused `ops.ties_merge`. What this module adds on top of the op is
mergekit 0.1.5's parameter semantics: which parameters exist and their defaults (gamma and
epsilon are per model, as in mergekit), magnitude trimming that keeps at least one element
(`max(1, int(density * n))`), and the model-wide threshold of the TIES paper
(`trim_scope: model`, for the magnitude trimmers ties and breadcrumbs(_ties)), computed in
`prepare` by streaming every task vector through `ops.threshold.MagnitudeHistogram` once, so
that merge_tensor stays per-tensor. The random sparsifiers (DARE, DELLA) have no threshold to
share, so they refuse `trim_scope: model`.

sce weighs models by their mean squared task vector and elects signs on the unweighted sum,
which the fused op (weights from the config, election on the weighted sum) cannot express; it is
written here in torch with the DESIGN.md arithmetic (see `sce_merge`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..ops.threshold import (KEEP_NOTHING, MagnitudeHistogram, Threshold, keep_mask, magnitude_threshold,
                             threshold_backend)
from ..ops._fma import fma_f32
from ..ops.ties import OutlierBand, outlier_ranks, ties_merge
from ..values import is_number
from .base import MergeMethod, TensorTask, register
from .contract import ContractMethod

TRIM_SCOPES = ("tensor", "model")


def magnitude_k(density: float, n: int) -> int:
    """Elements mergekit's magnitude sparsifier keeps: none at density <= 0, else
    max(1, int(density * n)), so a positive density never empties a non-empty tensor."""
    return 0 if density <= 0 or n == 0 else max(1, int(density * n))


def input_names(task: TensorTask) -> list[str]:
    """How errors name the task's inputs: their model paths, else their positions (in-memory merges)."""
    return [f"model {name}" for name in task.model_names] if len(task.model_names) == len(task.inputs) else \
        [f"model {i}" for i in range(len(task.inputs))]


def check_densities(tensor: str, params: list[dict[str, Any]], models: list[str]) -> None:
    """A density is the fraction of a task vector kept: one outside [0, 1] (or a true/false) is a
    mistake, which mergekit would clamp without a word (1.5 keeping all, -0.1 none)."""
    for model, model_params in zip(models, params):
        density = model_params["density"]
        if not (is_number(density) and 0 <= density <= 1):
            raise ConfigError(f"parameter `density` of {model} is {density!r} for tensor {tensor}; it must be a "
                              "number from 0 to 1 (the fraction of the task vector kept)")


class TaskVectorMerge(MergeMethod):
    """b + lambda * (consensus) sum_i w_i sparsify(x_i - b) (/ sum of the counted w_i if normalize).

    `trim_scope` (tensor, the default and mergekit's behaviour, or model) is accepted by every
    sparsifying method so that `trim_scope: model` gets a reason when it cannot apply:
    subclasses that support it set `model_wide_params` (the per-model parameters that fix a
    model-wide selection and so must be the same for all of a model's tensors)."""

    sparsify: ClassVar[str]
    consensus: ClassVar[bool]
    required_model_params = ("weight",)
    model_params: ClassVar[dict[str, Any]] = {"density": 1.0}
    requires_base = True
    model_wide_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        # tensor name -> one model-wide threshold (or None: keep all) per input model.
        self.model_thresholds: dict[str, list[Any]] | None = None

    @staticmethod
    def defaults(normalize: bool, rescale: bool) -> dict[str, Any]:
        """mergekit's shared parameters (plus fastmerge's trim_scope); int8_mask only picks
        mergekit's mask dtype, so it is accepted and has no effect."""
        return {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0, "trim_scope": "tensor"}

    def _check_scope(self, scope: Any, where: str) -> None:
        if scope not in TRIM_SCOPES:
            raise ConfigError(f"{where}: parameter `trim_scope` must be one of {', '.join(TRIM_SCOPES)}, got {scope!r}")
        if scope == "model" and not self.model_wide_params:
            raise ConfigError(
                f"{where}: {self.name} sparsifies at random ({self.sparsify}), so there is no magnitude threshold "
                "to share across a model and `trim_scope: model` cannot apply; remove it, or use ties or "
                "breadcrumbs(_ties) for model-wide trimming"
            )

    def prepare(self, context: Any) -> None:
        self._check_densities(context.plan)
        scopes = {t.global_params["trim_scope"] for t in context.plan.tensors if not t.copy_only}
        for scope in scopes:
            self._check_scope(scope, f"merge_method {self.name}")
        if "model" not in scopes:
            return
        if len(scopes) > 1:
            raise ConfigError("`trim_scope: model` must hold for every tensor (a model-wide threshold spans them all)")
        self.model_thresholds = model_wide_thresholds(context.plan, context.device, context.backend, self)

    @staticmethod
    def _check_densities(plan: Any) -> None:
        """Every tensor's densities, before the merge writes anything."""
        for tensor in plan.tensors:
            models = [f"model {plan.checkpoint_names[ref.checkpoint]}" for ref in tensor.inputs]
            check_densities(tensor.name, tensor.params, models)

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        if not task.inputs:
            return task.base.to(task.out_dtype)
        check_densities(task.name, task.params, input_names(task))  # merge_tensors has no plan
        settings = task.global_params
        densities = [float(p["density"]) for p in task.params]
        return ties_merge(
            task.base,
            task.inputs,
            [float(p["weight"]) for p in task.params],
            densities=densities,
            thresholds=self.thresholds(task, densities),
            normalize=settings["normalize"],
            lam=float(settings["lambda"]),
            out_dtype=task.out_dtype,
            sparsify=self.sparsify,
            consensus=self.consensus,
            rescale=settings["rescale"],
            **self.sparsifier_options(task),
            seed=task.seed,
            tensor_name=task.name,
            backend=task.backend,
            input_names=input_names(task),
        )

    def thresholds(self, task: TensorTask, densities: list[float]) -> list[Any] | None:
        """Per-model thresholds the op uses instead of densities (None: the op's own sparsifier
        decides): the model-wide ones under `trim_scope: model`."""
        scope = task.global_params["trim_scope"]
        self._check_scope(scope, f"tensor {task.name}")
        if scope == "tensor":
            return None
        if self.model_thresholds is None:
            raise ConfigError(
                f"tensor {task.name}: `trim_scope: model` needs every tensor of every model before merging; "
                "run the merge from a config (fastmerge.run / fastmerge run), not tensor by tensor"
            )
        return self.model_thresholds[task.name]

    def sparsifier_options(self, task: TensorTask) -> dict[str, Any]:
        """Per-model sparsifier parameters beyond density (gamma, epsilon), one value per model."""
        return {}

    def model_histogram(self, params: dict[str, Any], backend: str, name: str) -> MagnitudeHistogram | None:
        """The model-wide selection of a model with these parameters (None: it keeps everything)."""
        raise NotImplementedError

    def model_threshold(self, histogram: MagnitudeHistogram, index: int) -> Any:
        """Tensor `index`'s share of a model-wide selection, in the form `ties_merge` takes."""
        raise NotImplementedError


class MagnitudeTrim(TaskVectorMerge):
    """Top-k trimming by |d|, per tensor (mergekit) or per model over its whole task vector."""

    sparsify = "magnitude"
    model_wide_params = ("density",)

    def thresholds(self, task: TensorTask, densities: list[float]) -> list[Threshold | None]:
        given = super().thresholds(task, densities)
        if given is not None:
            return given
        backend = threshold_backend(task.base.device, task.backend)
        return [
            None if density >= 1 else magnitude_threshold(
                x, magnitude_k(density, x.numel()), base=task.base, backend=backend, name=f"{task.name} ({who})"
            )
            for who, x, density in zip(input_names(task), task.inputs, densities)
        ]

    def model_histogram(self, params: dict[str, Any], backend: str, name: str) -> MagnitudeHistogram | None:
        density = float(params["density"])
        return None if density >= 1 else MagnitudeHistogram(density, backend=backend, name=name)

    def model_threshold(self, histogram: MagnitudeHistogram, index: int) -> Threshold:
        return histogram.tensor_threshold(index)


def model_wide_thresholds(plan: Any, device: torch.device, backend: str | None,
                          method: TaskVectorMerge) -> dict[str, list[Any]]:
    """One selection per input model over its whole task vector (the TIES paper's trimming),
    split into per-tensor shares. Two streaming passes over every tensor (coarse, then exact
    histogram), one tensor in memory at a time. A model's `method.model_wide_params` (its
    density, and gamma for breadcrumbs) must be the same for all its tensors: a model-wide
    top-k has one k."""
    tensors = [t for t in plan.tensors if not t.copy_only and t.inputs]
    histograms: dict[int, MagnitudeHistogram | None] = {}
    settings: dict[int, tuple[tuple[str, float], ...]] = {}
    for tensor in tensors:
        for ref, params in zip(tensor.inputs, tensor.params):
            model = plan.checkpoint_names[ref.checkpoint]
            mine = tuple((name, float(params[name])) for name in method.model_wide_params)
            known = settings.setdefault(ref.checkpoint, mine)
            if known != mine:
                differ = ", ".join(f"{name} {a} vs {b}" for (name, a), (_, b) in zip(mine, known) if a != b)
                raise ConfigError(
                    f"`trim_scope: model` needs one {' and one '.join(method.model_wide_params)} per model, but "
                    f"{model} has different values for tensor {tensor.name} than elsewhere ({differ})"
                )
            if ref.checkpoint not in histograms:
                histograms[ref.checkpoint] = method.model_histogram(
                    params, threshold_backend(device, backend), f"task vector of {model}")
    order: dict[tuple[str, int], int] = {}
    for phase in (1, 2):
        added = {checkpoint: 0 for checkpoint in histograms}
        for tensor in tensors:
            base = plan.checkpoints[tensor.base.checkpoint].tensor(tensor.base.name).to(device)
            for ref in tensor.inputs:
                histogram = histograms[ref.checkpoint]
                if histogram is None:
                    continue
                histogram.add(plan.checkpoints[ref.checkpoint].tensor(ref.name).to(device), base)
                order[tensor.name, ref.checkpoint] = added[ref.checkpoint]
                added[ref.checkpoint] += 1
                plan.checkpoints[ref.checkpoint].release(ref.name)
            plan.checkpoints[tensor.base.checkpoint].release(tensor.base.name)
        if phase == 1:
            for histogram in histograms.values():
                if histogram is not None:
                    histogram.refine()
    return {
        tensor.name: [
            None if histograms[ref.checkpoint] is None
            else method.model_threshold(histograms[ref.checkpoint], order[tensor.name, ref.checkpoint])
            for ref in tensor.inputs
        ]
        for tensor in tensors
    }


@register
class Ties(MagnitudeTrim):
    name = "ties"
    consensus = True
    global_params = TaskVectorMerge.defaults(normalize=True, rescale=False)


class RandomDrop(TaskVectorMerge):
    """DARE: keep each element with probability density (seeded Philox draws)."""

    sparsify = "random"


@register
class DareTies(RandomDrop):
    name = "dare_ties"
    consensus = True
    global_params = TaskVectorMerge.defaults(normalize=False, rescale=True)


@register
class DareLinear(RandomDrop):
    name = "dare_linear"
    consensus = False
    global_params = TaskVectorMerge.defaults(normalize=False, rescale=True)


class OutlierTrim(TaskVectorMerge):
    """Breadcrumbs: drop the top int(gamma n) by |d| and the smallest, keeping int(density n)
    (mergekit's rules, `ops.ties.outlier_ranks`); model-wide, n is the model's whole task vector."""

    sparsify = "magnitude_outliers"
    model_params = {"density": 1.0, "gamma": 0.01}
    model_wide_params = ("density", "gamma")

    def sparsifier_options(self, task: TensorTask) -> dict[str, Any]:
        return {"gamma": [float(p["gamma"]) for p in task.params]}

    def model_histogram(self, params: dict[str, Any], backend: str, name: str) -> MagnitudeHistogram | None:
        density, gamma = float(params["density"]), float(params["gamma"])
        if density >= 1:
            return None
        return MagnitudeHistogram(density, backend=backend, name=name,
                                  ranks=lambda total: outlier_ranks(total, density, gamma))

    def model_threshold(self, histogram: MagnitudeHistogram, index: int) -> OutlierBand:
        return OutlierBand(dropped=histogram.tensor_threshold(index, 0), reached=histogram.tensor_threshold(index, 1))


@register
class Breadcrumbs(OutlierTrim):
    name = "breadcrumbs"
    consensus = False
    global_params = TaskVectorMerge.defaults(normalize=False, rescale=False)


@register
class BreadcrumbsTies(OutlierTrim):
    name = "breadcrumbs_ties"
    consensus = True
    global_params = TaskVectorMerge.defaults(normalize=False, rescale=False)


class RankedDrop(TaskVectorMerge):
    """DELLA: keep with a probability that grows with the element's |d| rank along dim 1."""

    sparsify = "della"
    model_params = {"density": 1.0, "epsilon": 0.15}

    def sparsifier_options(self, task: TensorTask) -> dict[str, Any]:
        return {"epsilon": [float(p["epsilon"]) for p in task.params]}


@register
class Della(RankedDrop):
    name = "della"
    consensus = True
    global_params = TaskVectorMerge.defaults(normalize=True, rescale=True)


@register
class DellaLinear(RankedDrop):
    name = "della_linear"
    consensus = False
    global_params = TaskVectorMerge.defaults(normalize=False, rescale=True)


@register
class Sce(ContractMethod):
    """SCE (select, calculate, erase): no config weights; see `sce_merge`."""

    name = "sce"
    global_params = {"int8_mask": False, "select_topk": 1.0}
    global_bounds = {"select_topk": (0.0, 1.0, False)}
    requires_base = True
    min_inputs = 0

    def merge(self, task: TensorTask) -> torch.Tensor:
        if not task.inputs:
            return task.base.to(task.out_dtype)
        select_topk = float(task.global_params["select_topk"])
        return sce_merge(task.base, task.inputs, select_topk, task.out_dtype, task.backend, task.name)


def sce_merge(base: torch.Tensor, inputs: list[torch.Tensor], select_topk: float, out_dtype: torch.dtype,
              backend: str | None = None, name: str = "tensor") -> torch.Tensor:
    """SCE as mergekit 0.1.5 computes it, in fp32 with a fixed order.

    (Reference implementation living in the method module: ops.ties_merge elects signs on the
    config-weighted sum, SCE on the plain sum with data-derived weights.)
      1. d_i = fp32(x_i - b); if select_topk < 1, keep only the top int(select_topk * nnz(var))
         elements by the population variance over models (exact top-k, ops.threshold), in all d_i;
      2. w_i = mean(d_i^2) / sum_j mean(d_j^2) in fp64 (uniform 1/K if the sum is < 1e-6);
      3. elect = d_1 + d_2 + ... (fp32, in order); model i counts where d_i != 0 and has the
         elected sign (+ where elect >= 0);
      4. mixed = fma(w_i, d_i, mixed), div = fp32(div + w_i) over the counted models in order;
      5. out = b + mixed / max(div, 1e-6), rounded once to out_dtype.
    """
    b = base.reshape(-1).float()
    deltas = [x.reshape(-1).float() - b for x in inputs]
    if select_topk < 1:
        deltas = _variance_selected(deltas, select_topk, backend, name)
    weights = _sce_weights(deltas)
    elect = torch.zeros_like(b)
    for d in deltas:
        elect = elect + d
    positive = elect >= 0
    mixed, div = torch.zeros_like(b), torch.zeros_like(b)
    for w, d in zip(weights, deltas):
        counted = (d != 0) & ((d > 0) == positive)
        w32 = torch.tensor(w, dtype=torch.float32)
        mixed = torch.where(counted, fma_f32(w32, d, mixed), mixed)
        div = torch.where(counted, div + w32, div)
    out = b + mixed / div.clamp(min=1e-6)
    return out.to(out_dtype).reshape(base.shape)


def _variance_selected(deltas: list[torch.Tensor], select_topk: float, backend: str | None, name: str) -> list[torch.Tensor]:
    """Zero every element outside the top int(select_topk * nnz(var)) by variance over models."""
    variance = torch.var(torch.stack(deltas), dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * select_topk) if select_topk > 0 else 0
    threshold = KEEP_NOTHING if k == 0 else magnitude_threshold(
        variance, k, backend=threshold_backend(variance.device, backend), name=f"{name} (variance over models)"
    )
    keep = keep_mask(variance, threshold)
    return [torch.where(keep, d, torch.zeros_like(d)) for d in deltas]


def _sce_weights(deltas: list[torch.Tensor]) -> list[float]:
    """Each model's share of the mean squared task vectors, in fp64."""
    means = [float(d.double().square().mean()) if d.numel() else 0.0 for d in deltas]
    total = sum(means)
    if abs(total) < 1e-6:
        return [1.0 / len(deltas)] * len(deltas)
    return [m / total for m in means]
