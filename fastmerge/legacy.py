"""mergekit-legacy's flags turned into a merge config (`fastmerge legacy`, `fastmerge-legacy`).

mergekit-legacy builds one config from the old merge scripts' flags, and these rules are its
(mergekit 0.1.5), so a command line gives the same merge under both:

- the models are the `--merge` paths in order, then `--base-model` when it is not one of them;
- `--density` and `--weight` are given once for every model (the base included) or once per
  model in that order; fewer leave the last models without one;
- slerp takes exactly one `--weight`, which becomes its `t`;
- `normalize` (on unless `--no-normalize`) and `--int8-mask` are method parameters;
  `--bf16` sets `dtype: bfloat16`, else the models' own dtype is kept.

Where mergekit passes a setting the method has no use for (slerp's `normalize`, `--naive-count`,
which mergekit 0.1.5 carries as `consensus_method: count` but no method reads), mergekit ignores
it without a word. fastmerge stops on parameters a method does not take, so those settings are
left out of the config and reported in the notes instead. A `--density` or `--weight` the method
does not take is still an error, since the user asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import ConfigError
from .methods import get_method


@dataclass
class LegacyConfig:
    """The merge config the flags describe and what was left out of it, one line each."""

    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def legacy_config(merge: Sequence[str], *, base_model: str | None = None, method: str = "ties",
                  weights: Sequence[float] = (), densities: Sequence[float] = (), normalize: bool = True,
                  int8_mask: bool = False, bf16: bool = False, naive_count: bool = False) -> LegacyConfig:
    """The config mergekit-legacy would build from these flags (see the module docstring)."""
    if not merge:
        raise ConfigError("--merge: give at least one model to merge")
    merger = get_method(method)  # an unknown method is an error here, naming the choices
    names = list(merge) + ([base_model] if base_model and base_model not in merge else [])
    models: list[dict[str, Any]] = [{"model": name, "parameters": {}} for name in names]
    parameters: dict[str, Any] = {}
    notes: list[str] = []

    _spread("--density", "density", densities, models)
    if method == "slerp":
        if len(weights) != 1:
            raise ConfigError(f"--weight: slerp takes exactly one (its t), got {len(weights)}")
        parameters["t"] = weights[0]
    else:
        _spread("--weight", "weight", weights, models)

    # normalize is always set (on by default), so only a --no-normalize the method cannot take
    # is worth a note; --int8-mask is set only when asked for.
    if "normalize" in merger.global_params:
        parameters["normalize"] = normalize
    elif not normalize:
        notes.append(_left_out("normalize: false", method))
    if int8_mask and "int8_mask" in merger.global_params:
        parameters["int8_mask"] = True
    elif int8_mask:
        notes.append(_left_out("int8_mask: true", method))
    if naive_count:
        notes.append("--naive-count ignored, as mergekit 0.1.5 ignores it: its sign election always sums the "
                     "weighted task vectors")

    config: dict[str, Any] = {"merge_method": method}
    if base_model:
        config["base_model"] = base_model
    config["models"] = models
    if parameters:
        config["parameters"] = parameters
    if bf16:
        config["dtype"] = "bfloat16"
    return LegacyConfig(config, notes)


def _left_out(setting: str, method: str) -> str:
    return f"`{setting}` left out: merge_method {method} has no such parameter (mergekit ignores it)"


def _spread(flag: str, key: str, values: Sequence[float], models: list[dict[str, Any]]) -> None:
    """One value for every model, or values for the first models in order (mergekit's rule)."""
    if len(values) > len(models):
        raise ConfigError(f"{flag}: {len(values)} values for {len(models)} models (each --merge, then "
                          "--base-model when it is not one of them); give one for all or one per model")
    spread = list(values) * len(models) if len(values) == 1 else values
    for model, value in zip(models, spread):
        model["parameters"][key] = value
