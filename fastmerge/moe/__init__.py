"""Mixture-of-experts models built from dense ones (mergekit-moe's configs and output)."""

from .config import Expert, MoESpec, load_moe_config
from .build import MoEReport, build_moe

__all__ = ["Expert", "MoEReport", "MoESpec", "build_moe", "load_moe_config"]
