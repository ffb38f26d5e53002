"""In-memory merging: the same methods and kernels as `fastmerge.run`, on tensors and state dicts
a caller already holds (the entry point for tools that merge state dicts today)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .errors import ConfigError, PlanError
from .methods import get_method
from .methods.base import MergeMethod, TensorTask
from .plan import REQUIRED, check_parameter_value, layer_index, tensors_by_name


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    name: str = "tensor",
    out_dtype: torch.dtype | None = None,
    seed: int = 0,
    backend: str | None = None,
    **params: Any,
) -> torch.Tensor:
    """Merge one tensor from K models. Per-model parameters (e.g. `weight`, `density`) are a
    scalar for all models or a sequence with one value per model; method parameters (e.g.
    `normalize`, `lambda_` for `lambda`) are scalars."""
    merger = get_method(method)
    task = _task(merger, name, list(tensors), base, params, out_dtype, seed, backend)
    return _owned(merger.merge_tensor(task), task)


def merge_state_dicts(
    method: str,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    missing: str = "error",
    out_dtype: torch.dtype | None = None,
    seed: int = 0,
    backend: str | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge whole state dicts tensor by tensor, as `fastmerge pytorch` merges files: every key
    of the state dicts (the base adds none of its own). A key that not every state dict has is
    an error, unless `missing` is "union" (merge it from the state dicts that have it; per-model
    parameter lists are narrowed to them) or "intersection" (leave it out). A base the method
    needs must have every merged key. Non-float tensors are copied from the base, else from
    the first state dict that has them."""
    if not state_dicts:
        raise ConfigError("merge_state_dicts needs at least one state dict")
    merger = get_method(method)
    merged = {}
    for i, state in enumerate(state_dicts):
        if not isinstance(state, Mapping):
            raise ConfigError(f"state dict {i} is a {type(state).__name__}, not a mapping of names to tensors")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise PlanError(f"state dict {i}: {key!r} is a {type(value).__name__}, not a tensor; pass only the "
                                "tensors (training checkpoints keep steps and optimizer state beside them)")
    kept, _ = tensors_by_name(
        dict.fromkeys(k for state in state_dicts for k in state), list(range(len(state_dicts))),
        lambda i, key: key in state_dicts[i], missing, lambda lacking: "state dict(s) " + ", ".join(map(str, lacking)),
        "pass missing='union' to merge it from the others or missing='intersection' to leave it out")
    for key, present in kept:
        if base is not None and merger.uses_base and key not in base:
            raise PlanError(f"tensor {key} is missing from the base state dict, which {merger.name} needs for it")
        inputs = [state_dicts[i][key] for i in present]
        reference = base[key] if base is not None and key in base else inputs[0]
        for i, tensor in zip(present, inputs):
            if tensor.shape != reference.shape:
                raise PlanError(f"tensor {key} has shape {list(tensor.shape)} in state dict {i} but {list(reference.shape)} in the reference")
        if not reference.is_floating_point():
            merged[key] = reference.clone()
            continue
        narrowed = {k: [v[i] for i in present] if isinstance(v, (list, tuple)) and len(v) == len(state_dicts) else v
                    for k, v in params.items()}
        task = _task(merger, key, inputs, base.get(key) if base is not None else None, narrowed, out_dtype, seed, backend)
        merged[key] = _owned(merger.merge_tensor(task), task)
    return merged


def _owned(result: torch.Tensor, task: TensorTask) -> torch.Tensor:
    """The result as a tensor of its own. A method may hand back an input as it is (passthrough
    without a scale, a dtype that needs no conversion): the engine writes it out at once, but a
    caller here would change its input by changing the result."""
    held = [*task.inputs, *([task.base] if task.base is not None else [])]
    storages = {t.untyped_storage().data_ptr() for t in held if t.numel()}
    return result.clone() if result.numel() and result.untyped_storage().data_ptr() in storages else result


def _task(merger: MergeMethod, name: str, inputs: list[torch.Tensor], base: torch.Tensor | None,
          params: dict[str, Any], out_dtype: torch.dtype | None, seed: int, backend: str | None) -> TensorTask:
    if not inputs:
        raise ConfigError("nothing to merge: no input tensors")
    if merger.requires_base and base is None:
        raise ConfigError(f"merge_method {merger.name} needs a base tensor (base=...)")
    params = {("lambda" if key == "lambda_" else key): value for key, value in params.items()}
    model_names = set(merger.model_params) | set(merger.required_model_params)
    unknown = sorted(set(params) - model_names - set(merger.global_params))
    if unknown:
        accepted = ", ".join(sorted(model_names | set(merger.global_params)))
        raise ConfigError(f"unknown parameter `{unknown[0]}` for merge_method {merger.name}; it accepts: {accepted}")
    per_model = [_model_params(merger, params, i, len(inputs), name) for i in range(len(inputs))]
    global_params = {
        key: check_parameter_value(key, params.get(key, default), default, "the merge", name)
        for key, default in merger.global_params.items()
    }
    return TensorTask(
        name=name,
        inputs=inputs,
        base=base if merger.uses_base else None,
        params=per_model,
        global_params=global_params,
        out_dtype=out_dtype or inputs[0].dtype,
        layer=layer_index(name),
        seed=seed,
        backend=backend,
        model_names=[str(i) for i in range(len(inputs))],  # errors say "model 0", "model 1"
    )


def _model_params(merger: MergeMethod, params: dict[str, Any], index: int, count: int, tensor: str) -> dict[str, Any]:
    resolved = {}
    defaults = dict(merger.model_params) | {key: REQUIRED for key in merger.required_model_params}
    for key, default in defaults.items():
        value = params.get(key, default)
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ConfigError(f"parameter `{key}` has {len(value)} values for {count} models")
            value = value[index]
        if value is REQUIRED:
            raise ConfigError(f"merge_method {merger.name} needs parameter `{key}` for every model")
        resolved[key] = check_parameter_value(key, value, default, f"model {index}", tensor) if value is not None else None
    return resolved
