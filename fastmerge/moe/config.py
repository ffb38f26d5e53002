"""mergekit-moe's config: a base model, the expert models, and how the routers are initialised.

The schema is mergekit-moe's (`base_model`, `experts` with `source_model`, `positive_prompts`,
`negative_prompts`, `noise_scale`, `residual_scale`, `gate_mode`, `dtype`, `experts_per_token`,
`shared_experts`, `architecture`), and so are its refusals: fewer experts than experts per token,
experts without prompts where the gate mode needs them, every expert with the same prompts, every
expert the same model (allowed with `allow_all_same`, mergekit's
--i-understand-this-is-not-useful-without-training). Unlike mergekit, unknown keys are errors and
every refusal is a ConfigError naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import check_keys, model_reference, read_mapping
from ..dtypes import parse_config_dtype
from ..errors import ConfigError
from ..values import is_finite_number, is_integer

# mergekit's gate modes. "hidden" and "hidden_last" read the prompts' last token, "hidden_avg"
# their mean (mergekit 0.1.5 averages only for "hidden_avg").
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
RANDOM_MODES = ("random", "uniform_random")
GATE_MODES = PROMPT_MODES + RANDOM_MODES

_TOP_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
_EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}


@dataclass(frozen=True)
class Expert:
    """One expert: the model whose MLPs it takes, the prompts its router vector comes from, and
    mergekit's optional Gaussian noise on its MLP weights and scale on its down projection."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class MoESpec:
    base_model: str
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: Any = None  # torch.dtype, or None: the base config's dtype
    experts_per_token: int = 2
    architecture: str | None = None
    shared_experts: tuple[Expert, ...] = ()  # experts every token goes through (Qwen2-MoE, DeepSeek)

    def models(self) -> list[str]:
        """The base model, then each expert's and shared expert's model, in config order (repeats kept)."""
        return [self.base_model, *(e.source_model for e in self.members())]

    def members(self) -> list[Expert]:
        """The routed experts, then the shared ones: the order of their router vectors."""
        return [*self.experts, *self.shared_experts]


def load_moe_config(config: str | Path | Mapping[str, Any], allow_all_same: bool = False) -> MoESpec:
    """Parse and check a mergekit-moe config given as a dict, a YAML file path or YAML text."""
    data = read_mapping(config, "`base_model` and `experts`")
    check_keys(data, _TOP_KEYS, "config")
    base_model = model_reference(data.get("base_model"), "base_model")
    if base_model is None:
        raise ConfigError("`base_model` is required: the model whose attention, embeddings and norms the MoE keeps")
    experts = _experts(data.get("experts"), "experts")
    shared = _experts(data["shared_experts"], "shared_experts") if data.get("shared_experts") else ()
    if len({bool(e.positive_prompts) for e in shared}) > 1:
        raise ConfigError("`shared_experts`: give every shared expert prompts, or none")
    architecture = data.get("architecture")
    if architecture is not None and not isinstance(architecture, str):
        raise ConfigError(f"`architecture` must be an output's name (Mixtral, DeepSeek MoE, Qwen MoE, Qwen3 MoE), "
                          f"got {architecture!r}")
    gate_mode = data.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise ConfigError(f"`gate_mode: {gate_mode!r}` is not a gate mode; use one of {', '.join(GATE_MODES)}")
    per_token = data.get("experts_per_token", 2)
    if not is_integer(per_token) or per_token < 1:
        raise ConfigError(f"`experts_per_token` must be an integer >= 1, got {per_token!r}")
    if len(experts) < per_token:
        raise ConfigError(f"`experts` has {len(experts)} models but `experts_per_token` is {per_token}: "
                          "each token needs that many experts")
    dtype = data.get("dtype")
    spec = MoESpec(base_model, experts, gate_mode, None if dtype is None else parse_config_dtype(dtype, "dtype"),
                   per_token, architecture, shared)
    _check_prompts(spec)
    if not allow_all_same and len(experts) > 1 and len({e.source_model for e in experts}) == 1:
        raise ConfigError("every expert is the same model, so the MoE would compute what that model does at "
                          "more cost; to train it further anyway, pass --i-understand-this-is-not-useful-without-training")
    return spec


def _experts(value: Any, where: str) -> tuple[Expert, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"`{where}` must be a non-empty list of experts, each with a `source_model`")
    experts = []
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"`{at}` must be a mapping with a `source_model`")
        check_keys(entry, _EXPERT_KEYS, at)
        model = model_reference(entry.get("source_model"), f"{at}.source_model")
        if model is None:
            raise ConfigError(f"`{at}.source_model` is required")
        experts.append(Expert(model, _prompts(entry.get("positive_prompts"), f"{at}.positive_prompts"),
                              _prompts(entry.get("negative_prompts"), f"{at}.negative_prompts"),
                              _number(entry.get("noise_scale"), f"{at}.noise_scale", low=0.0),  # a standard deviation
                              _number(entry.get("residual_scale"), f"{at}.residual_scale")))
    return tuple(experts)


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"`{where}` must be a list of strings")
    return tuple(value)


def _number(value: Any, where: str, low: float | None = None) -> float | None:
    """A finite number (at least `low` where given): a NaN scale wrote NaN into the experts."""
    if value is None:
        return None
    if not is_finite_number(value) or (low is not None and value < low):
        raise ConfigError(f"`{where}` must be a finite number{f' >= {low}' if low is not None else ''}, got {value!r}")
    return float(value)


def _check_prompts(spec: MoESpec) -> None:
    """The gate modes that read prompts need some for every expert, and different ones: experts
    with the same prompts get the same router vector, so the router cannot tell them apart."""
    if spec.gate_mode not in PROMPT_MODES:
        return
    for i, expert in enumerate(spec.experts):
        if not expert.positive_prompts:
            raise ConfigError(f"`experts[{i}].positive_prompts` is empty; gate_mode {spec.gate_mode} makes each "
                              "expert's router vector from its prompts")
    if len(spec.experts) > 1 and len({(e.positive_prompts, e.negative_prompts) for e in spec.experts}) == 1:
        raise ConfigError("every expert has the same positive and negative prompts, so their router vectors would be "
                          "the same; give each expert prompts for what it should handle")
