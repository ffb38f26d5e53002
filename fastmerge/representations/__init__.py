"""Data-aware building blocks: sample loading, typical-sample selection and layer-by-layer
hidden-state capture (used by RECALL; transformers is needed only for capture)."""

from .samples import load_samples
from .typical import select_typical

__all__ = ["load_samples", "select_typical"]
