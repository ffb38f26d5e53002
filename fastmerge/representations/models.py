"""The transformers side of representation capture: tokenizer and a weightless model skeleton.

transformers is an optional extra (`models`); everything that needs it goes through
`require_transformers`, so a missing install fails with the pip command instead of an
ImportError deep inside a merge. The skeleton is built on the meta device (no memory, no random
init) so that capture can materialise one decoder block at a time from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, MissingExtraError


def require_transformers(purpose: str) -> Any:
    """The transformers module, or a MissingExtraError saying what needs it (`purpose`) and
    which extra to install. Every feature that runs models or reads tokenizers asks here."""
    try:
        import transformers
    except ImportError:
        raise MissingExtraError(f"{purpose} needs transformers: pip install 'fastmerge[models]'") from None
    return transformers


def open_tokenizer(directory: Path, purpose: str, why: str) -> Any:
    """The tokenizer saved in `directory`, or a CheckpointError saying what it is needed for
    (`why`); `purpose` names the feature in a missing-transformers error."""
    transformers = require_transformers(purpose)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises many unrelated types for a missing tokenizer
        raise CheckpointError(f"cannot load a tokenizer from {directory} ({type(exc).__name__}: {exc}); {why}") from None


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer saved beside a checkpoint, with a padding token (padding is masked out)."""
    tokenizer = open_tokenizer(directory, "RECALL", "RECALL tokenizes the samples with the new model's tokenizer, "
                               "save it beside the weights")
    if tokenizer.pad_token_id is None:
        # Any id works: padded positions are excluded by the attention mask and the pooling.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = "right"
    return tokenizer


@dataclass
class DecoderSkeleton:
    """A decoder-only model on the meta device and the checkpoint names of its parts.

    embed_name: the input-embedding weight; layer_prefixes[i]: the prefix of block i's tensors;
    norm_prefix: the final norm's prefix. `rotary` is a real (CPU) rotary-embedding module,
    which holds no checkpoint weights. `base` is the whole base model (lm_head excluded) with
    `rotary` installed, and `base_prefix` the checkpoint prefix of its tensors.
    """

    config: Any
    base: torch.nn.Module
    base_prefix: str
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    rotary: torch.nn.Module
    embed_name: str
    layer_prefixes: list[str]
    norm_prefix: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)


def build_skeleton(config_dict: dict, where: Path | str, dtype: torch.dtype = torch.float32) -> DecoderSkeleton:
    """Meta-device skeleton for the architecture in `config_dict` (a config.json) in `dtype`.

    Supports decoder-only models laid out like Llama (embed_tokens, layers, norm, rotary_emb
    under the base model): Llama, Mistral, Qwen2 and relatives.
    """
    transformers = require_transformers(f"running the model of {where}")
    model_type = config_dict.get("model_type")
    try:
        config = transformers.AutoConfig.for_model(**config_dict)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:
        raise CheckpointError(
            f"transformers cannot build the architecture of {where} (model_type {model_type!r}): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    base = model.base_model
    parts = {name: getattr(base, name, None) for name in ("embed_tokens", "layers", "norm", "rotary_emb")}
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} has no {', '.join(missing)} in its base model; RECALL's "
            "layer-by-layer capture supports Llama-style decoders (Llama, Mistral, Qwen2, ...)"
        )
    qualified = {id(module): name for name, module in model.named_modules()}
    layers_name = qualified[id(parts["layers"])]
    with torch.device("cpu"):
        rotary = type(parts["rotary_emb"])(config=config)
    base.rotary_emb = rotary
    return DecoderSkeleton(
        config=config,
        base=base,
        base_prefix=qualified[id(base)] + ".",
        layers=parts["layers"],
        norm=parts["norm"],
        rotary=rotary,
        embed_name=qualified[id(parts["embed_tokens"])] + ".weight",
        layer_prefixes=[f"{layers_name}.{i}." for i in range(len(parts["layers"]))],
        norm_prefix=qualified[id(parts["norm"])] + ".",
    )
