"""Which weights are pruned: name filters over a checkpoint's 2-D weight matrices.

Pruning targets linear-layer weight matrices only: biases, norms and embeddings hold few
parameters and are disproportionately harmful to sparsify. A filter is an alias or a substring
of the tensor name. Aliases cover the usual layouts, so `targets: [mlp]` means the feed-forward
block in Llama/Mistral/Qwen/GPT-2 (`.mlp.`) and in BERT-style encoders
(`.intermediate.dense`, `.layer.N.output.dense`, but not `.attention.output.dense`).
"""

from __future__ import annotations

import re
from typing import Iterable

from ..errors import ConfigError

ALIASES = {
    "mlp": re.compile(r"\.mlp\.|\.feed_forward\.|\.intermediate\.dense\.|\.layer\.\d+\.output\.dense\."),
    "attention": re.compile(r"\.self_attn\.|\.attn\.|\.attention\."),
}


def is_target(name: str, shape: Iterable[int], filters: list[str]) -> bool:
    """Whether tensor `name` (a weight matrix of `shape`) is selected by any of `filters`."""
    if len(tuple(shape)) != 2 or not name.endswith("weight") or "embed" in name:
        return False
    for pattern in filters:
        alias = ALIASES.get(pattern)
        if (alias.search(name) if alias is not None else pattern in name):
            return True
    return False


def select_targets(shapes: dict[str, tuple[int, ...]], filters: list[str], where: str) -> list[str]:
    """The targeted tensor names of a model, in the given order; none at all is a config error."""
    names = [name for name, shape in shapes.items() if is_target(name, shape, filters)]
    if not names:
        raise ConfigError(
            f"`targets: {filters}` selects no weight matrix of {where}; use a substring of its "
            f"tensor names or an alias ({', '.join(ALIASES)})"
        )
    return names
