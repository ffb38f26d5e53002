"""RECALL: representation-aligned, layer-wise merging (METHODS.md "RECALL", arXiv 2510.20479).

prepare(): pick typical samples of the new task (k-means over the new model's mean-pooled last
hidden states), capture every model's mean-pooled hidden states on them layer by layer, and turn
per-layer RBF similarity to the new model into per-layer softmax weights. merge_tensor(): blend
each tensor with its layer's weights on the fused blend kernel. Shallow layers, where models
still agree, get near-uniform weights (old knowledge is kept); deep layers, where the new model
diverges, lean towards it.

A configured base model joins the candidates (weighted by its own similarity): with weights that
sum to one, the task-vector form b + sum w_i (x_i - b) equals sum w_i x_i, so the base matters
only as a candidate, e.g. to pull general-purpose layers back towards the pretrained weights.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import ops
from ..errors import CheckpointError, ConfigError, PlanError
from ..representations.capture import capture_representations, tokenize_batches
from ..representations.models import build_skeleton, load_tokenizer, require_transformers
from ..representations.samples import load_samples
from ..representations.typical import select_typical
from ..values import is_integer, is_number
from .base import MergeMethod, TensorTask, register

WEIGHTS_FILE = "recall_weights.json"
HEATMAP_FILE = "recall_weights.png"


@dataclass
class RecallWeights:
    """Per-row (embedding output, block 0 .. block L-1) results; columns are the candidates."""

    weights: torch.Tensor  # [L+1, K] fp64, rows sum to 1
    similarity: torch.Tensor  # [L+1, K] fp64, mean RBF similarity to the new model
    sigma: torch.Tensor  # [L+1] fp64, the kernel width used per row


def recall_weights(
    representations: Sequence[torch.Tensor],
    new_index: int,
    temperature: float = 1.0,
    sigma: float | None = None,
    backend: str | None = None,
) -> RecallWeights:
    """Layer weights from representations [L+1, n, d] of K models on the same n samples.

    similarity[l, k] = mean_s exp(-||r_k[l, s] - r_new[l, s]||^2 / (2 sigma_l^2)), computed
    with ops.rbf_similarity (on `backend`, the merge's --backend) over all models' rows against
    the new model's at once, so one sigma per layer (median heuristic, unless given) is shared
    by every model and the similarities are comparable.
    weights[l] = softmax_k(similarity[l, k] / temperature).
    """
    if not temperature > 0 or not math.isfinite(temperature):
        raise ConfigError(f"RECALL parameter temperature must be a positive number, got {temperature}")
    if sigma is not None and (not sigma > 0 or not math.isfinite(sigma)):
        raise ConfigError(f"RECALL parameter sigma must be a positive number (or unset for the median heuristic), got {sigma}")
    count, n = len(representations), representations[0].shape[1]
    stacked = torch.cat([r.float() for r in representations], dim=1)  # [L+1, K*n, d]
    kernel, used_sigma = ops.rbf_similarity(stacked, representations[new_index].float(), sigma=sigma, backend=backend)
    paired = kernel.double().reshape(kernel.shape[0], count, n, n).diagonal(dim1=2, dim2=3)  # [L+1, K, n]
    similarity = paired.mean(dim=2)
    _check_similarity(similarity, used_sigma, new_index)
    weights = torch.softmax(similarity / temperature, dim=1)
    return RecallWeights(weights, similarity, torch.as_tensor(used_sigma, dtype=torch.float64).expand(kernel.shape[0]).clone())


def _check_similarity(similarity: torch.Tensor, sigma: Any, new_index: int) -> None:
    """No NaN weights: refuse non-finite similarities, and layers where every other model's
    similarity underflowed to 0 (the weights would ignore the representations entirely)."""
    if not torch.isfinite(similarity).all():
        raise PlanError("RECALL similarities are not finite (NaN/inf in the captured hidden states?)")
    if similarity.shape[1] < 2:
        return
    others = torch.cat([similarity[:, :new_index], similarity[:, new_index + 1 :]], dim=1)
    dead = (others == 0).all(dim=1).nonzero().flatten().tolist()
    if dead:
        sigmas = torch.as_tensor(sigma, dtype=torch.float64).expand(similarity.shape[0])
        raise ConfigError(
            f"RECALL: every similarity to the new model underflows to 0 in layer row(s) {dead} "
            f"(sigma {[float(sigmas[i]) for i in dead]} is far below the distances); raise `sigma` "
            "or leave it unset to use the median heuristic"
        )


@register
class Recall(MergeMethod):
    """Per-layer weights from representation similarity to the new model (see module docstring)."""

    name = "recall"
    whole_model_step = "weighs each layer by the models' hidden states on the samples"
    model_params = {"new": False}
    global_params = {
        "samples": None,
        "num_typical": 32,
        "temperature": 1.0,
        "sigma": None,
        "max_length": 256,
        "batch_size": 8,
    }

    def prepare(self, context: Any) -> None:
        require_transformers("RECALL (it runs the models)")
        params = self._params(context.global_params)
        candidates = list(context.models) + ([context.base] if context.base is not None else [])
        names = list(context.model_names) + (["base"] if context.base is not None else [])
        new_index = _new_model_index(context.model_params, context.model_names)
        skeletons = _skeletons(candidates, names)
        if context.layer_count is not None and context.layer_count != skeletons[0].num_layers:
            raise ConfigError(
                f"RECALL weights the models' own {skeletons[0].num_layers} layers, but the merge writes "
                f"{context.layer_count}; use `models:`, not layer-rearranging `slices:`"
            )
        samples = load_samples(params["samples"])
        tokenizer = load_tokenizer(candidates[new_index].directory)

        def capture(index: int, texts: Sequence[str]) -> torch.Tensor:
            batches = tokenize_batches(tokenizer, texts, params["max_length"], params["batch_size"])
            representations = capture_representations(candidates[index], skeletons[index], batches, context.device)
            _require_finite(representations, names[index])
            return representations

        new_all = capture(new_index, samples)
        typical = select_typical(new_all[-1], params["num_typical"], seed=context.seed)
        typical_texts = [samples[i] for i in typical]
        if params["sigma"] is None:
            _require_distinct_samples(typical_texts)
        reps = [new_all[:, typical] if i == new_index else capture(i, typical_texts) for i in range(len(candidates))]
        result = recall_weights(reps, new_index, params["temperature"], params["sigma"], backend=context.backend)
        self._rows = result.weights.tolist()
        self._embed_name = skeletons[new_index].embed_name
        self._has_base = context.base is not None
        write_weights_json(Path(context.output_dir) / WEIGHTS_FILE, result, names, new_index, typical, params)
        write_heatmap(Path(context.output_dir) / HEATMAP_FILE, result.weights, names)

    def _params(self, given: dict[str, Any]) -> dict[str, Any]:
        params = {**self.global_params, **{k: v for k, v in given.items() if v is not None}}
        if params["samples"] is None:
            raise ConfigError("RECALL needs `parameters.samples`: a .txt/.jsonl file or a list of the new task's texts")
        for key in ("num_typical", "max_length", "batch_size"):
            value = params[key]
            if not is_integer(value) or value < 1:
                raise ConfigError(f"RECALL parameter {key} must be a positive integer, got {value!r}")
        for key in ("temperature", "sigma"):
            value = params[key]
            if value is not None and not is_number(value):
                raise ConfigError(f"RECALL parameter {key} must be a number, got {value!r}")
            params[key] = None if value is None else float(value)
        return params

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        if task.layer is not None:
            row = self._rows[task.layer + 1]
        elif task.name == self._embed_name:
            row = self._rows[0]
        else:  # final norm, lm_head: what the last layer's output feeds
            row = self._rows[-1]
        inputs = list(task.inputs) + ([task.base] if self._has_base else [])
        return ops.blend(inputs, row, out_dtype=task.out_dtype, backend=task.backend)


def _require_finite(representations: torch.Tensor, name: str) -> None:
    """Refuse a model whose hidden states [L+1, n, d] hold NaN or inf, naming the first such row.

    Checked right after capture, where it is cheap and the model is known: later, the distance
    kernel would turn NaN distances into 0 (the broken model looking identical to the new one)
    and k-means++ would fail on NaN probabilities.
    """
    bad = (~torch.isfinite(representations)).flatten(1).any(dim=1).nonzero().flatten().tolist()
    if bad:
        where = row_labels(representations.shape[0])[bad[0]]
        raise PlanError(f"RECALL: model {name}: its hidden states at {where} are not finite (NaN or inf in its weights?)")


def _require_distinct_samples(typical_texts: Sequence[str]) -> None:
    """The median-heuristic kernel width needs at least 2 distinct typical samples.

    With one (num_typical 1, a single line, or identical lines) the new model's rows are all
    the same, so the only non-zero distance in a layer is old-to-new itself: sigma^2 = D/2 and
    every similarity is exp(-1), whatever the models, and the weights would ignore them.
    """
    if len(set(typical_texts)) < 2:
        raise ConfigError(
            "RECALL: the median heuristic for sigma needs at least 2 distinct typical samples, got 1 (with one, "
            "every similarity is exp(-1) whatever the models); give more distinct samples, set num_typical >= 2, "
            "or give `sigma`"
        )


def _new_model_index(model_params: list[dict[str, Any]], names: list[str]) -> int:
    """The model marked `new: true`, else the last one in config order."""
    marked = [i for i, p in enumerate(model_params) if p.get("new")]
    if len(marked) > 1:
        raise ConfigError(f"RECALL: only one model can be `new: true`, got {', '.join(names[i] for i in marked)}")
    return marked[0] if marked else len(model_params) - 1


def _skeletons(candidates: list[Any], names: list[str]) -> list[Any]:
    """One meta skeleton per model; all must agree on depth and width to be compared."""
    skeletons = []
    for checkpoint, name in zip(candidates, names):
        if checkpoint.directory is None or not checkpoint.config:
            raise CheckpointError(f"RECALL runs {name} and needs its model directory with config.json, got {checkpoint.path}")
        skeletons.append(build_skeleton(checkpoint.config, checkpoint.path))
    shapes = {(s.num_layers, s.hidden_size) for s in skeletons}
    if len(shapes) > 1:
        listing = ", ".join(f"{n}: {s.num_layers} layers x {s.hidden_size}" for n, s in zip(names, skeletons))
        raise PlanError(f"RECALL compares layer by layer, so all models need the same layers and hidden size ({listing})")
    return skeletons


def row_labels(num_rows: int) -> list[str]:
    return ["embeddings"] + [f"layer {i}" for i in range(num_rows - 1)]


def write_weights_json(path: Path, result: RecallWeights, names: list[str], new_index: int, typical: list[int], params: dict) -> None:
    """recall_weights.json: the weights (rows: embeddings, layers; columns: models) and how they arose."""
    record = {
        "models": names,
        "new_model": names[new_index],
        "rows": row_labels(result.weights.shape[0]),
        "weights": result.weights.tolist(),
        "similarity": result.similarity.tolist(),
        "sigma": result.sigma.tolist(),
        "temperature": params["temperature"],
        "typical_samples": typical,
        "note": "final norm and lm_head use the last row; embeddings the first",
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def write_heatmap(path: Path, weights: torch.Tensor, names: list[str]) -> None:
    """A PNG heat map of the weights (layers down, models across). matplotlib is optional: without
    it the map is skipped with a warning, since the JSON carries the same numbers."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(f"matplotlib is not installed, so {path.name} was not written (pip install matplotlib)", stacklevel=2)
        return
    rows = weights.shape[0]
    labels = [Path(n).name[-24:] or n for n in names]  # model paths: the directory name is enough
    figure = Figure(figsize=(max(4.0, 2.5 + 1.1 * len(names)), max(3.0, 1.5 + 0.28 * rows)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(weights.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=float(weights.max()))
    axes.set_xticks(range(len(names)), labels, rotation=30, ha="right")
    axes.set_yticks(range(rows), row_labels(rows))
    axes.set_title("RECALL layer weights")
    figure.colorbar(image, ax=axes)
    figure.savefig(path, dpi=100)
