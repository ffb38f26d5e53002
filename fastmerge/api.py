"""In-memory merging: the same methods and kernels as `fastmerge.run`, on tensors and state dicts
a caller already holds (the entry point for tools that merge state dicts today)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .dtypes import FLOAT_OUTPUT_DTYPES, kernel_input, merged_dtype, parse_config_dtype
from .errors import ConfigError, PlanError
from .methods import get_method
from .methods.base import MergeMethod, TensorTask
from .plan import REQUIRED, check_parameter_value, layer_index, tensors_by_name
from .values import check_seed, is_number


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
    scalar for all models or a sequence with one value per model (a list, an array or a 1-d
    tensor); method parameters (e.g. `normalize`, `lambda_` for `lambda`) are scalars. The result
    has `out_dtype` (a torch dtype or its name), by default the dtype a config merge writes: the
    inputs', promoted where they differ, fp8 and fp64 as fp32."""
    merger = get_method(method)
    task = _task(merger, name, _tensor_list(tensors), base, params, out_dtype, seed, backend)
    return _owned(merger.merge_tensor(task), task)


def _tensor_list(tensors: Any) -> list[torch.Tensor]:
    """`tensors` as a list, one per model: a single tensor is not such a list (iterating it would
    take its rows for models)."""
    if isinstance(tensors, torch.Tensor) or isinstance(tensors, (str, bytes, Mapping)) or \
            not isinstance(tensors, Sequence):
        hint = "; wrap one model's tensor in a list, [x]" if isinstance(tensors, torch.Tensor) else ""
        raise ConfigError(f"tensors must be a list with one tensor per model, got a {type(tensors).__name__}{hint}")
    return list(tensors)


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
    _check_names(merger, _api_names(params))  # also when no key turns out to need a merge
    merged = {}
    for i, state in enumerate(state_dicts):
        _check_state_dict(state, f"state dict {i}")
    if base is not None:
        _check_state_dict(base, "the base state dict")
    kept, _ = tensors_by_name(
        dict.fromkeys(k for state in state_dicts for k in state), list(range(len(state_dicts))),
        lambda i, key: key in state_dicts[i], missing, lambda lacking: "state dict(s) " + ", ".join(map(str, lacking)),
        "pass missing='union' to merge it from the others or missing='intersection' to leave it out")
    for key, present in kept:
        if base is not None and merger.uses_base and key not in base:
            raise PlanError(f"tensor {key} is missing from the base state dict, which {merger.name} needs for it")
        inputs = [state_dicts[i][key] for i in present]
        used_base = base is not None and merger.uses_base and key in base
        kinds = {t.is_floating_point() for t in inputs + ([base[key]] if used_base else [])}
        if len(kinds) > 1:
            raise PlanError(f"tensor {key} is a float tensor in some state dicts (or the base) and not in others; "
                            "only float tensors merge")
        if kinds == {False}:  # integer buffers are copied, from the base where it has them
            merged[key] = (base[key] if base is not None and key in base else inputs[0]).clone()
            continue
        narrowed = {k: [v[i] for i in present] if isinstance(v, (list, tuple)) and len(v) == len(state_dicts) else v
                    for k, v in ((k, _plain(v)) for k, v in params.items())}
        task = _task(merger, key, inputs, base.get(key) if base is not None else None, narrowed, out_dtype, seed, backend,
                     [f"state dict {i}" for i in present])
        merged[key] = _owned(merger.merge_tensor(task), task)
    return merged


def _owned(result: torch.Tensor, task: TensorTask) -> torch.Tensor:
    """The result as a tensor of its own. A method may hand back an input as it is (passthrough
    without a scale, a dtype that needs no conversion): the engine writes it out at once, but a
    caller here would change its input by changing the result."""
    held = [*task.inputs, *([task.base] if task.base is not None else [])]
    storages = {t.untyped_storage().data_ptr() for t in held if t.numel()}
    return result.clone() if result.numel() and result.untyped_storage().data_ptr() in storages else result


def _check_state_dict(state: Any, what: str) -> None:
    if not isinstance(state, Mapping):
        raise ConfigError(f"{what} is a {type(state).__name__}, not a mapping of names to tensors")
    for key, value in state.items():
        if not isinstance(key, str):
            raise PlanError(f"{what}: key {key!r} is a {type(key).__name__}; tensor names are strings")
        if not isinstance(value, torch.Tensor):
            raise PlanError(f"{what}: {key!r} is a {type(value).__name__}, not a tensor; pass only the "
                            "tensors (training checkpoints keep steps and optimizer state beside them)")


def _api_names(params: dict[str, Any]) -> dict[str, Any]:
    """`lambda_` (Python's spelling) as `lambda`; both at once is ambiguous."""
    if "lambda" in params and "lambda_" in params:
        raise ConfigError("give `lambda_` or `lambda`, not both")
    return {("lambda" if key == "lambda_" else key): value for key, value in params.items()}


def _check_names(merger: MergeMethod, params: dict[str, Any]) -> None:
    if merger.whole_model_step is not None:
        raise ConfigError(f"merge_method {merger.name} {merger.whole_model_step}, a step over whole models: run it "
                          "from a config (fastmerge.run / fastmerge run), not tensor by tensor")
    model_names = set(merger.model_params) | set(merger.required_model_params)
    unknown = sorted(set(params) - model_names - set(merger.global_params))
    if unknown:
        accepted = ", ".join(sorted(model_names | set(merger.global_params)))
        raise ConfigError(f"unknown parameter `{unknown[0]}` for merge_method {merger.name}; it accepts: {accepted}")


def _check_inputs(merger: MergeMethod, name: Any, inputs: list[Any], base: Any, labels: list[str]) -> None:
    """Tensors of one shape and a float dtype; `labels` names the inputs in errors."""
    if not isinstance(name, str):
        raise ConfigError(f"name must be the tensor's name (a str), got a {type(name).__name__}")
    named = list(zip(labels, inputs)) + ([("the base", base)] if base is not None else [])
    for what, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"{what} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.layout != torch.strided:
            raise ConfigError(f"{what} is a {tensor.layout} tensor; pass it dense (.to_dense())")
        if not tensor.is_floating_point():
            raise PlanError(f"tensor {name}: {what} has dtype {tensor.dtype}; only float tensors merge")
    if merger.requires_base and base is None:
        raise ConfigError(f"merge_method {merger.name} needs a base tensor (base=...)")
    for what, tensor in named[1:]:
        if tensor.shape != named[0][1].shape:
            raise PlanError(f"tensor {name}: {what} has shape {list(tensor.shape)} but {named[0][0]} has "
                            f"{list(named[0][1].shape)}")


def _output_dtype(out_dtype: Any, inputs: list[torch.Tensor], base: torch.Tensor | None) -> torch.dtype:
    """The given dtype (a torch dtype or its config name), else the one a config merge writes."""
    if out_dtype is None:
        return merged_dtype(t.dtype for t in inputs + ([base] if base is not None else []))
    if isinstance(out_dtype, str):
        return parse_config_dtype(out_dtype, "out_dtype")
    if out_dtype not in FLOAT_OUTPUT_DTYPES:
        raise ConfigError(f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype!r}")
    return out_dtype


def _task(merger: MergeMethod, name: str, inputs: list[torch.Tensor], base: torch.Tensor | None,
          params: dict[str, Any], out_dtype: torch.dtype | None, seed: int, backend: str | None,
          labels: list[str] | None = None) -> TensorTask:
    """The task of one tensor, every argument checked; `labels` names the inputs in errors
    (default: tensors[0], tensors[1], ...)."""
    if not inputs:
        raise ConfigError("nothing to merge: no input tensors")
    params = _api_names(params)
    _check_names(merger, params)
    base = base if merger.uses_base else None  # linear's: unused, as in mergekit
    _check_inputs(merger, name, inputs, base, labels or [f"tensors[{i}]" for i in range(len(inputs))])
    check_seed(seed)
    per_model = [_model_params(merger, params, i, len(inputs), name) for i in range(len(inputs))]
    global_params = {
        key: check_parameter_value(key, _plain(params.get(key, default)), default, "the merge", name)
        for key, default in merger.global_params.items()
    }
    return TensorTask(
        name=name,
        inputs=[kernel_input(t) for t in inputs],
        base=kernel_input(base) if base is not None else None,
        params=per_model,
        global_params=global_params,
        out_dtype=_output_dtype(out_dtype, inputs, base),
        layer=layer_index(name),
        seed=seed,
        backend=backend,
        model_names=[str(i) for i in range(len(inputs))],  # errors say "model 0", "model 1"
    )


def _model_params(merger: MergeMethod, params: dict[str, Any], index: int, count: int, tensor: str) -> dict[str, Any]:
    resolved = {}
    defaults = dict(merger.model_params) | {key: REQUIRED for key in merger.required_model_params}
    for key, default in defaults.items():
        value = _plain(params.get(key, default))
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ConfigError(f"parameter `{key}` has {len(value)} values for {count} models")
            value = _plain(value[index])
        if value is REQUIRED:
            raise ConfigError(f"merge_method {merger.name} needs parameter `{key}` for every model")
        if not (value is None and default is None) and not isinstance(default, bool) and not is_number(value):
            raise ConfigError(f"parameter `{key}` of model {index} must be a number, got {value!r}")
        resolved[key] = None if value is None else check_parameter_value(key, value, default, f"model {index}", tensor)
    return resolved


def _plain(value: Any) -> Any:
    """numpy and torch values as Python ones (an array or a 1-d tensor as a list, one value per
    model), so that the checks that follow see numbers, NaN included."""
    return value.tolist() if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) else value
