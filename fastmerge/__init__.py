"""fastmerge: native-accelerated merging of neural-network checkpoints.

Python API: `run(config, out_dir, **options)` merges checkpoints on disk (mergekit-style config);
`run_multi` runs a multi-document config; `extract_lora` factors a fine-tune into a LoRA
adapter; `build_moe` builds a Mixtral MoE from dense models (mergekit-moe's config); `tokensurgeon`
gives a model another model's tokenizer (mergekit-tokensurgeon); `merge_tensors` / `merge_state_dicts` merge tensors already in memory; `fastmerge.ops`
holds the kernels. The entry points load lazily so `import fastmerge.ops` stays light.
"""

import os
from importlib import import_module

# MKL's strict reproducibility mode makes a matrix product's bytes independent of the thread
# count, which DESIGN.md's determinism contract needs wherever a method iterates on products
# (FDA's anchor optimisation). MKL reads the setting at its first call, so it is set on import,
# before fastmerge runs any; a value the user chose is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .errors import FastmergeError

__version__ = "0.1.0"

_LAZY = {
    "run": "engine",
    "prepare_plan": "engine",
    "MergeReport": "engine",
    "merge_tensors": "api",
    "merge_state_dicts": "api",
    "run_multi": "multi",
    "extract_lora": "extraction",
    "build_moe": "moe",
    "tokensurgeon": "surgery",
}

__all__ = ["FastmergeError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fastmerge' has no attribute {name!r}")
