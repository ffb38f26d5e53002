"""Merge methods, registered by their config name. Importing this package registers them all."""

from .base import MergeMethod, TensorTask, get_method, method_names, register
from . import linear  # noqa: F401  (registers linear, task_arithmetic)
from . import fda  # noqa: F401  (registers fda)
from . import recall  # noqa: F401  (registers recall)
from . import slerp  # noqa: F401  (registers slerp, nuslerp, multislerp)
from . import karcher  # noqa: F401  (registers karcher)
from . import model_stock  # noqa: F401  (registers model_stock)
from . import nearswap  # noqa: F401  (registers nearswap)
from . import passthrough  # noqa: F401  (registers passthrough)
from . import arcee_fusion  # noqa: F401  (registers arcee_fusion)
from . import ram  # noqa: F401  (registers ram, ramplus_tl)
from . import task_vectors  # noqa: F401  (registers ties, dare_*, breadcrumbs*, della*, sce)

__all__ = ["MergeMethod", "TensorTask", "get_method", "method_names", "register"]
