"""Structural rules a method states once: how many input models it takes, which method-level
parameters have no default (slerp's `t`), and the range of its numeric method-level parameters.

The planner already rejects unknown parameters and missing per-model ones; these rules are
checked here, in `prepare`, over every planned tensor, so a config that cannot work fails before
the first byte is written. `merge_tensor` checks them again because the in-memory API
(`fastmerge.merge_tensors`) never calls `prepare`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..values import is_finite_number, is_integer, is_number
from .base import MergeMethod, TensorTask


def check_number(name: str, value: Any, tensor: str) -> None:
    """A parameter without a default that must be a number (the planner checks only those with a
    numeric default): a ConfigError naming it and the tensor otherwise."""
    if not is_number(value):
        raise ConfigError(f"parameter `{name}` must be a number for tensor {tensor}, got {value!r}")


class ContractMethod(MergeMethod):
    """A MergeMethod with an input-count range and required global parameters.

    Subclasses implement `merge(task)`; `merge_tensor` validates the task and calls it.
    Counts exclude the base model (it is not among `task.inputs` when `uses_base`).
    """

    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int | None] = None
    # Method-level parameters without a default (numbers, all of them): declared in
    # `global_params` with value None.
    required_global_params: ClassVar[tuple[str, ...]] = ()
    # Method-level numbers and their range: (lowest, highest or None, whether an integer). An
    # out-of-range value would run without a word (karcher's max_iter 2.5 as 2, a negative tol).
    global_bounds: ClassVar[dict[str, tuple[float, float | None, bool]]] = {}

    def prepare(self, context: Any) -> None:
        for tensor in context.plan.tensors:
            if not tensor.copy_only:
                self.check(tensor.name, len(tensor.inputs), tensor.global_params)

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        self.check(task.name, len(task.inputs), task.global_params)
        return self.merge(task)

    def merge(self, task: TensorTask) -> torch.Tensor:
        raise NotImplementedError

    def check(self, tensor: str, count: int, global_params: dict[str, Any]) -> None:
        """Raise ConfigError naming the tensor when the input count or a required parameter is wrong."""
        if count < self.min_inputs or (self.max_inputs is not None and count > self.max_inputs):
            raise ConfigError(f"merge_method {self.name} takes {self._count_text()} for tensor {tensor}, got {count}")
        for name in self.required_global_params:
            value = global_params.get(name)
            if value is None:
                raise ConfigError(
                    f"merge_method {self.name} needs parameter `{name}` for tensor {tensor}; "
                    f"set it under the top-level (or slice) `parameters`"
                )
            check_number(name, value, tensor)
        for name, (low, high, integer) in self.global_bounds.items():
            value = global_params.get(name)
            if not (is_integer(value) if integer else is_finite_number(value)) or value < low or \
                    (high is not None and value > high):
                kind = "an integer" if integer else "a number"
                bounds = f"from {low} to {high}" if high is not None else f">= {low}"
                raise ConfigError(f"parameter `{name}` of merge_method {self.name} must be {kind} {bounds} for tensor "
                                  f"{tensor}, got {value!r}")

    def _count_text(self) -> str:
        if self.max_inputs == self.min_inputs:
            amount = f"exactly {self.min_inputs}"
        elif self.max_inputs is None:
            amount = f"at least {self.min_inputs}"
        else:
            amount = f"{self.min_inputs} to {self.max_inputs}"
        plural = "" if self.max_inputs == self.min_inputs == 1 else "s"
        return f"{amount} model{plural}" + (" besides the base model" if self.uses_base else "")
