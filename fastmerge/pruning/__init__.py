"""GAPrune and baseline pruning: gradient statistics, importance scores, global / per-tensor /
2:4 masks, the masks.safetensors format, and mask hooks for merges (fastmerge.methods.masks)."""

from .config import PruneConfig, load_prune_config
from .mask_file import MaskSet, architecture_fingerprint, load_masks
from .prune import PruneReport, compute_masks, prune

__all__ = ["PruneConfig", "load_prune_config", "MaskSet", "architecture_fingerprint", "load_masks",
           "PruneReport", "compute_masks", "prune"]
