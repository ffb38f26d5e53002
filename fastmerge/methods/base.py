"""What a merge method is, and the registry that maps config names to methods.

A method is a pure per-tensor function (`merge_tensor`) plus an optional whole-model `prepare`
step that runs before streaming (model-wide thresholds, RECALL's per-layer weights, GAPrune's
masks): prepare computes what it needs once and stores it on the method instance, and
merge_tensor stays a function of one tensor's inputs, so the engine can stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..errors import ConfigError


@dataclass
class TensorTask:
    """Everything one output tensor's merge needs.

    inputs: the models' tensors in config order (base excluded), zero-copy views, any float dtype.
    base: the base model's tensor or None. params: one dict per input model with its resolved
    parameters for this tensor (gradients and filters already applied); global_params: the
    method-level parameters resolved for this tensor. layer: decoder layer index or None.
    """

    name: str
    inputs: list[torch.Tensor]
    base: torch.Tensor | None
    params: list[dict[str, Any]]
    global_params: dict[str, Any]
    out_dtype: torch.dtype
    layer: int | None = None
    seed: int = 0
    backend: str | None = None
    model_names: list[str] = field(default_factory=list)


class MergeMethod:
    """Base class. Subclasses set `name`, the parameters they accept and their defaults."""

    name: ClassVar[str]
    # Parameters each model may carry (models[].parameters) and method-level ones (parameters:).
    model_params: ClassVar[dict[str, Any]] = {}
    global_params: ClassVar[dict[str, Any]] = {}
    # Parameters without a default that every model must give (e.g. `weight` for linear).
    required_model_params: ClassVar[tuple[str, ...]] = ()
    requires_base: ClassVar[bool] = False
    # Whether the method uses the base tensor when one is configured (linear ignores it).
    uses_base: ClassVar[bool] = True
    # What the method computes over whole models in `prepare` (the in-memory API, which merges
    # tensor by tensor, cannot run it), or None.
    whole_model_step: ClassVar[str | None] = None

    def prepare(self, context: Any) -> None:
        """Whole-model step before streaming; most methods need none."""

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        raise NotImplementedError


_REGISTRY: dict[str, Callable[[], MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make `cls` available under `cls.name` in configs."""
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> MergeMethod:
    """A fresh instance of the method called `name` in configs."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown merge_method {name!r}; known methods: {known}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)
