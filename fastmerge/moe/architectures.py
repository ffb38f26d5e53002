"""The MoE outputs fastmerge writes, and how one is chosen (mergekit-moe's rules).

Both lay out their experts the same way (transformers' fused layout, build.py); they differ in the
dense models they are built from, the base tensors they keep outside the MLPs, their config.json,
and the order in which mergekit-moe draws each expert's noise (which fastmerge keeps, so a seed
gives mergekit's bytes):

  Mixtral    from Llama or Mistral models; mergekit-moe's default
  Qwen3 MoE  from Qwen3 models (their q_norm / k_norm and any attention biases kept)

mergekit-moe's Qwen2-MoE and DeepSeek outputs (the ones with shared experts) are not written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError

_COMMON = r"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight" \
          r"|model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight"


@dataclass(frozen=True)
class MoEArchitecture:
    name: str  # mergekit-moe's name, which a config's `architecture` is a prefix of
    model_types: tuple[str, ...]  # the dense models' model_type
    kept: re.Pattern  # the base tensors it keeps (everything outside the MLPs)
    noise_order: tuple[str, ...]  # the order of each expert's projections in mergekit's noise draws
    config: Callable[[dict, int, int], dict]  # (base config.json, experts, experts per token) -> its config.json


def _mixtral_config(base: dict, experts: int, per_token: int) -> dict:
    # Mixtral's router settings that a Llama or Mistral config lacks: transformers' defaults.
    defaults = {"output_router_logits": False, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0}
    return {**defaults, **base, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "num_local_experts": experts, "num_experts_per_tok": per_token, "sliding_window": None}


def _qwen3_moe_config(base: dict, experts: int, per_token: int) -> dict:
    defaults = {"output_router_logits": False, "router_aux_loss_coef": 0.001, "mlp_only_layers": []}
    # transformers 5 names the expert count num_local_experts (what mergekit-moe writes), 4.x num_experts.
    return {**defaults, **base, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "num_local_experts": experts, "num_experts": experts, "num_experts_per_tok": per_token,
            "decoder_sparse_step": 1,
            "norm_topk_prob": True, "moe_intermediate_size": base.get("intermediate_size")}


MIXTRAL = MoEArchitecture(
    "Mixtral", ("llama", "mistral"),
    re.compile(_COMMON + r"|model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight"),
    ("gate_proj", "down_proj", "up_proj"), _mixtral_config)
QWEN3_MOE = MoEArchitecture(
    "Qwen3 MoE", ("qwen3",),
    re.compile(_COMMON + r"|model\.layers\.\d+\.self_attn\.([qkvo]_proj\.(weight|bias)|[qk]_norm\.weight)"),
    ("gate_proj", "up_proj", "down_proj"), _qwen3_moe_config)
ARCHITECTURES = (MIXTRAL, QWEN3_MOE)


def select_architecture(requested: str | None, model_type: str, where: str) -> MoEArchitecture:
    """The output for a base of `model_type`, among those whose name starts with `requested`
    (case-insensitive; any, without it). `where` names the base model in errors."""
    named = [a for a in ARCHITECTURES if requested is None or a.name.lower().startswith(requested.lower())]
    if not named:
        raise ConfigError(f"`architecture: {requested!r}`: fastmerge writes {' and '.join(a.name for a in ARCHITECTURES)} "
                          "MoEs (not mergekit-moe's Qwen2-MoE or DeepSeek ones)")
    for architecture in named:
        if model_type in architecture.model_types:
            return architecture
    builds = "; ".join(f"{a.name} from {' or '.join(a.model_types)} models" for a in named)
    raise ConfigError(f"`base_model` {where}: model_type {model_type!r}; fastmerge builds {builds}")
