"""The MoE outputs fastmerge writes, and how one is chosen (mergekit-moe's four, by its rules).

  Mixtral       from Llama or Mistral models, no shared experts; mergekit-moe's default
  DeepSeek MoE  from Llama or Mistral models, at most one shared expert, which has no router
                (config.json points at deepseek-ai's remote modeling code, as mergekit's does)
  Qwen MoE      Qwen2-MoE, from Llama, Mistral or Qwen2 models and exactly one shared expert,
                with a router of its own (prompts needed unless gate_mode is random); a Llama's
                missing q/k/v biases are written as zeros, since Qwen2 attention has them
  Qwen3 MoE     from Qwen3 models (q_norm, k_norm and any attention biases kept), no shared experts

Mixtral and Qwen3 MoE write each layer's experts fused, in transformers 5's layout; DeepSeek and
Qwen MoE one tensor per expert and projection (`mlp.experts.{i}.gate_proj.weight`), as
mergekit-moe 0.1.5 writes each. They differ too in the order mergekit draws the experts' noise:
expert by expert (each expert's projections in `noise_order`), or projection by projection
(every expert, then the shared one, for each projection in `noise_order`, the order of the MLP
weights in mergekit's architecture files). fastmerge keeps that order, so a seed gives
mergekit's bytes.

Choosing (mergekit's rule): of the outputs whose name starts with the config's `architecture`
(all without it), those that take the config; Mixtral if it is one of them, else the first in
the order above.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError
from .config import MoESpec

_COMMON = r"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight" \
          r"|model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight"
_LLAMA_ATTENTION = r"|model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight"


@dataclass(frozen=True)
class MoEArchitecture:
    name: str  # mergekit-moe's name, which a config's `architecture` is a prefix of
    model_types: tuple[str, ...]  # the dense models' model_type
    refuses: Callable[[MoESpec], str | None]  # why a config does not fit it (shared experts, prompts), or None
    kept: re.Pattern  # the base tensors it keeps (everything outside the MLPs)
    fused: bool  # experts stacked into gate_up_proj / down_proj, else one tensor per expert and projection
    noise_by_projection: bool
    noise_order: tuple[str, ...]
    config: Callable[[dict, int, int, int], dict]  # (base config.json, experts, per token, shared) -> config.json
    shared_name: str | None = None  # the shared expert's module under mlp.
    shared_router: bool = False  # writes mlp.shared_expert_gate.weight
    zero_biases: bool = False  # q/k/v biases the base lacks are written as zeros


def _no_shared(spec: MoESpec) -> str | None:
    return "it has no shared experts" if spec.shared_experts else None


def _deepseek_refuses(spec: MoESpec) -> str | None:
    if len(spec.shared_experts) > 1:
        return "it takes at most one shared expert"
    if any(e.positive_prompts or e.negative_prompts for e in spec.shared_experts):
        return "its shared expert has no router, so no prompts"
    return None


def _qwen_refuses(spec: MoESpec) -> str | None:
    if len(spec.shared_experts) != 1:
        return "it takes exactly one shared expert"
    if spec.gate_mode != "random" and not spec.shared_experts[0].positive_prompts:
        return f"its shared expert's router needs prompts with gate_mode {spec.gate_mode}"
    return None


def _mixtral_config(base: dict, experts: int, per_token: int, shared: int) -> dict:
    # Mixtral's router settings that a Llama or Mistral config lacks: transformers' defaults.
    defaults = {"output_router_logits": False, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0}
    return {**defaults, **base, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "num_local_experts": experts, "num_experts_per_tok": per_token, "sliding_window": None}


def _deepseek_config(base: dict, experts: int, per_token: int, shared: int) -> dict:
    remote = "deepseek-ai/deepseek-moe-16b-base--"
    return {**base, "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "n_routed_experts": experts,
            "n_shared_experts": shared or None, "num_experts_per_tok": per_token, "first_k_dense_replace": 0,
            "moe_layer_freq": 1, "scoring_func": "softmax", "norm_topk_prob": True,
            "moe_intermediate_size": base.get("intermediate_size"),
            "auto_map": {"AutoConfig": remote + "configuration_deepseek.DeepseekConfig",
                         "AutoModel": remote + "modeling_deepseek.DeepseekModel",
                         "AutoModelForCausalLM": remote + "modeling_deepseek.DeepseekForCausalLM"}}


# The Qwen MoE configs' router settings that a dense config lacks: transformers' defaults.
_QWEN_MOE_DEFAULTS = {"output_router_logits": False, "router_aux_loss_coef": 0.001, "mlp_only_layers": []}


def _qwen_moe_config(base: dict, experts: int, per_token: int, shared: int) -> dict:
    return {**_QWEN_MOE_DEFAULTS, **base, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "num_experts": experts, "num_experts_per_tok": per_token,
            "decoder_sparse_step": 1, "norm_topk_prob": True, "sliding_window": None, "use_sliding_window": False,
            "shared_expert_intermediate_size": base.get("intermediate_size"),
            "moe_intermediate_size": base.get("intermediate_size")}


def _qwen3_moe_config(base: dict, experts: int, per_token: int, shared: int) -> dict:
    # transformers 5 names Qwen3-MoE's expert count num_local_experts (what mergekit-moe writes), 4.x num_experts.
    return {**_QWEN_MOE_DEFAULTS, **base, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "num_local_experts": experts, "num_experts": experts, "num_experts_per_tok": per_token,
            "decoder_sparse_step": 1, "norm_topk_prob": True, "moe_intermediate_size": base.get("intermediate_size")}


MIXTRAL = MoEArchitecture(
    "Mixtral", ("llama", "mistral"), _no_shared, re.compile(_COMMON + _LLAMA_ATTENTION), fused=True,
    noise_by_projection=False, noise_order=("gate_proj", "down_proj", "up_proj"), config=_mixtral_config)
DEEPSEEK = MoEArchitecture(
    "DeepSeek MoE", ("llama", "mistral"), _deepseek_refuses, re.compile(_COMMON + _LLAMA_ATTENTION), fused=False,
    noise_by_projection=True, noise_order=("up_proj", "gate_proj", "down_proj"), config=_deepseek_config,
    shared_name="shared_experts")
QWEN_MOE = MoEArchitecture(
    "Qwen MoE", ("llama", "mistral", "qwen2"), _qwen_refuses,
    re.compile(_COMMON + _LLAMA_ATTENTION + r"|model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias"), fused=False,
    noise_by_projection=True, noise_order=("down_proj", "gate_proj", "up_proj"), config=_qwen_moe_config,
    shared_name="shared_expert", shared_router=True, zero_biases=True)
QWEN3_MOE = MoEArchitecture(
    "Qwen3 MoE", ("qwen3",), _no_shared,
    re.compile(_COMMON + r"|model\.layers\.\d+\.self_attn\.([qkvo]_proj\.(weight|bias)|[qk]_norm\.weight)"),
    fused=True, noise_by_projection=False, noise_order=("gate_proj", "up_proj", "down_proj"), config=_qwen3_moe_config)
ARCHITECTURES = (MIXTRAL, DEEPSEEK, QWEN_MOE, QWEN3_MOE)


def select_architecture(spec: MoESpec, model_type: str) -> MoEArchitecture:
    """The output for `spec` with a base of `model_type`, by mergekit-moe's rule (module docstring)."""
    requested = spec.architecture
    named = [a for a in ARCHITECTURES if requested is None or a.name.lower().startswith(requested.lower())]
    if not named:
        raise ConfigError(f"`architecture: {requested!r}` names none of the outputs: "
                          f"{', '.join(a.name for a in ARCHITECTURES)}")
    reasons = {a.name: f"it is built from {' or '.join(a.model_types)} models" if model_type not in a.model_types
               else a.refuses(spec) for a in named}
    fitting = [a for a in named if reasons[a.name] is None]
    if not fitting:
        why = "; ".join(f"not {name}: {reason}" for name, reason in reasons.items())
        raise ConfigError(f"no MoE output takes this config (base model_type {model_type!r}): {why}")
    return MIXTRAL if MIXTRAL in fitting else fitting[0]
