"""Argument checks shared by the ops, so every kernel rejects mismatched tensors with the same
clear message before any backend sees them."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch

from ..dtypes import NATIVE_CODES
from ..errors import KernelError


def labelled(name: str, tensors: Sequence[Any], base: Any = None) -> list[tuple[str, Any]]:
    """[("name[0]", tensors[0]), ...], then ("base", base) when one is given: the list that
    check_alike takes for a kernel of several inputs and an optional base."""
    return [(f"{name}[{i}]", t) for i, t in enumerate(tensors)] + ([("base", base)] if base is not None else [])


def check_alike(op: str, named: Sequence[tuple[str, Any]]) -> None:
    """Every (label, tensor) in `named` is a torch.Tensor of a kernel dtype (fp32, fp16, bf16,
    fp8) with the first one's shape and device; otherwise a KernelError naming `op` and the
    offending argument."""
    first_label, first = named[0]
    for label, t in named:
        if not isinstance(t, torch.Tensor):
            raise KernelError(f"{op}: {label} is a {type(t).__name__}, not a torch.Tensor")
        if t.shape != first.shape:
            raise KernelError(f"{op}: {label} has shape {tuple(t.shape)} but {first_label} has {tuple(first.shape)}")
        if t.dtype not in NATIVE_CODES:
            raise KernelError(f"{op}: {label} has dtype {t.dtype}; it must be fp32, fp16, bf16 or fp8")
        if t.device != first.device:
            raise KernelError(f"{op}: {label} is on {t.device} but {first_label} is on {first.device}")


def check_numbers(op: str, label: str, values: Sequence[Any], low: float | None = None,
                  high: float | None = None) -> None:
    """Each of `values` a finite number, within [low, high] where given: a NaN weight turns the
    whole result NaN, and a density of 2 keeps what 1 keeps, without a word."""
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or \
                (low is not None and value < low) or (high is not None and value > high):
            bounds = f" from {low} to {high}" if low is not None and high is not None else ""
            raise KernelError(f"{op}: {label}[{i}] is {value!r}; it must be a finite number{bounds}")
