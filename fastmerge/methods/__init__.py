"""Merge methods, registered by their config name. Importing this package registers them all."""

from .base import MergeMethod, TensorTask, get_method, method_names, register
from . import linear  # noqa: F401  (registers linear, task_arithmetic)
from . import recall  # noqa: F401  (registers recall)

__all__ = ["MergeMethod", "TensorTask", "get_method", "method_names", "register"]
