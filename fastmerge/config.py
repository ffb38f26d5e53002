"""mergekit-compatible merge configs: YAML text, a YAML file or a dict -> a validated MergeSpec.

The schema follows mergekit 0.1.5 so existing configs are a drop-in: `merge_method`,
`models` or `slices`, `base_model`, `parameters`, `dtype`, `out_dtype`, `tokenizer_source` or
the `tokenizer:` block, `chat_template`. Validation is strict (unknown keys and wrong types are
errors naming the key) because a silently ignored typo in a merge config produces a wrong model
that looks fine.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from .dtypes import parse_config_dtype
from .errors import ConfigError
from .io.lora import split_reference
from .values import is_integer, is_number
from .vocab.build import parse_tokenizer_source
from .vocab.chat_templates import check_chat_template
from .vocab.tokens import TokenEmbedding, TokenizerBlock, parse_tokenizer_block

# A parameter setting as written: a scalar, a gradient (list of scalars) or a filter list.
ParameterSetting = Any


@dataclass(frozen=True)
class Conditional:
    """One entry of a filter list: applies to tensors whose name contains `filter`."""

    value: Any
    filter: str | None = None

    def matches(self, tensor_name: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in tensor_name


@dataclass
class SourceSpec:
    """A model feeding a merge: a `models[]` entry, or a slice source with its layer range."""

    model: str
    parameters: dict[str, ParameterSetting] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None


@dataclass
class SliceSpec:
    """An output slice: consecutive output layers merged from the same-length source ranges."""

    sources: list[SourceSpec]
    base_model: str | None = None
    parameters: dict[str, ParameterSetting] = field(default_factory=dict)

    @property
    def layer_count(self) -> int:
        first = self.sources[0].layer_range
        return first[1] - first[0]


@dataclass
class MergeSpec:
    """A validated merge config. Exactly one of `models` / `slices` is set."""

    merge_method: str
    models: list[SourceSpec] | None
    slices: list[SliceSpec] | None
    base_model: str | None
    parameters: dict[str, ParameterSetting]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    tokenizer_source: str | None
    chat_template: str | None
    raw: dict[str, Any]
    # A masks.safetensors file (fastmerge prune) applied to the merged model to keep it sparse.
    output_mask: str | None = None
    # The `tokenizer:` block's per-token embeddings and padding (vocab/tokens.py).
    tokens: dict[str, TokenEmbedding] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    def referenced_models(self) -> list[str]:
        """Every model path the config names, base first, without repeats, in config order."""
        names: list[str] = []
        candidates = [self.base_model] if self.base_model else []
        for source in self.models or []:
            candidates.append(source.model)
        for out_slice in self.slices or []:
            if out_slice.base_model:
                candidates.append(out_slice.base_model)
            candidates.extend(s.model for s in out_slice.sources)
        for name in candidates:
            if name not in names:
                names.append(name)
        return names

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


_TOP_KEYS = {
    "merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "chat_template", "tokenizer", "modules", "output_mask",
}
_UNSUPPORTED_TOP_KEYS = {
    "modules": "multi-module (`modules:`) configs are not supported; use `models` or `slices`",
}


def load_config(config: str | Path | Mapping[str, Any]) -> MergeSpec:
    """Parse a config given as a dict, a path to a YAML file, or YAML text."""
    return parse_config(read_mapping(config, "at least `merge_method`"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last without a word, and in a merge config a second `merge_method:` or
    `parameters:` is a mistake whose meaning would be a guess (mergekit takes the last too)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: the base class says so
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """One YAML document (safe types only; a key given twice is an error)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def parse_yaml_documents(text: str) -> list[Any]:
    """Every YAML document of `text` (`---`-separated), as parse_yaml reads one."""
    return list(yaml.load_all(text, Loader=_UniqueKeyLoader))


def read_mapping(config: str | Path | Mapping[str, Any], needs: str) -> dict[str, Any]:
    """A config as a dict, given as one, as a path to a YAML file, or as YAML text; `needs`
    says in the error what a config must hold at least."""
    if isinstance(config, Mapping):
        return _plain(config)
    if isinstance(config, Path) or (isinstance(config, str) and "\n" not in config and config.endswith((".yml", ".yaml"))):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file {path} " + ("is not a file" if path.exists() else "does not exist"))
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path}: cannot read it as UTF-8 text ({exc})") from None
        origin = str(path)
    else:
        text, origin = str(config), "config text"
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must be a YAML mapping with {needs}")
    return data


def _plain(value: Any) -> Any:
    """A config built in Python may hold pathlib paths, tuples and numpy numbers: as the str,
    list, int and float that YAML gives, they validate alike and can be written back to
    mergekit_config.yml (the YAML writer refuses the others, which failed a finished merge)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)  # numpy's float64 is a float, but not one the YAML writer takes
    return value


def parse_config(data: dict[str, Any]) -> MergeSpec:
    """Validate a config dict (mergekit schema) into a MergeSpec."""
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; allowed keys: {', '.join(sorted(_TOP_KEYS - set(_UNSUPPORTED_TOP_KEYS)))}")
    for key, why in _UNSUPPORTED_TOP_KEYS.items():
        if data.get(key) is not None:
            raise ConfigError(f"`{key}`: {why}")

    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise ConfigError("`merge_method` is required and must be a method name such as linear or ties")

    has_models, has_slices = bool(data.get("models")), bool(data.get("slices"))
    if has_models == has_slices:
        raise ConfigError("give exactly one of `models` (a list of models) or `slices` (layer ranges)")

    models = [_parse_source(m, f"models[{i}]", with_range=False) for i, m in enumerate(_as_list(data, "models"))] if has_models else None
    slices = [_parse_slice(s, f"slices[{i}]") for i, s in enumerate(_as_list(data, "slices"))] if has_slices else None

    base_model = model_reference(data.get("base_model"), "base_model")
    tokenizer_source = data.get("tokenizer_source")
    block = TokenizerBlock("union")
    if data.get("tokenizer") is not None:
        if tokenizer_source is not None:
            raise ConfigError("give `tokenizer_source` or the `tokenizer:` block, not both (as in mergekit)")
        block = parse_tokenizer_block(data["tokenizer"])
        tokenizer_source = block.source
    if tokenizer_source is not None:
        parse_tokenizer_source(tokenizer_source)
    chat_template = data.get("chat_template")
    if chat_template is not None:
        if not isinstance(chat_template, str):
            raise ConfigError("`chat_template` must be a string (a template name or Jinja text)")
        check_chat_template(chat_template)

    output_mask = data.get("output_mask")
    if output_mask is not None and not isinstance(output_mask, str):
        raise ConfigError("`output_mask` must be the path of a masks.safetensors file")

    return MergeSpec(
        output_mask=output_mask,
        merge_method=method,
        models=models,
        slices=slices,
        base_model=base_model,
        parameters=_parse_parameters(data.get("parameters"), "parameters"),
        dtype=parse_config_dtype(data["dtype"], "dtype") if data.get("dtype") is not None else None,
        out_dtype=parse_config_dtype(data["out_dtype"], "out_dtype") if data.get("out_dtype") is not None else None,
        tokenizer_source=tokenizer_source,
        chat_template=chat_template,
        raw=data,
        tokens=block.tokens,
        pad_to_multiple_of=block.pad_to_multiple_of,
    )


def _as_list(data: dict[str, Any], key: str) -> list[Any]:
    value = data[key]
    if not isinstance(value, list):
        raise ConfigError(f"`{key}` must be a list")
    return value


def model_reference(value: Any, where: str) -> str | None:
    """A model reference (a path, `model+lora`, or mergekit's long form) checked and in its short
    form; None where the key is absent. `where` names the key in errors."""
    if value is None:
        return None
    if isinstance(value, dict) and "model" in value and set(value) <= {"model", "lora", "override_architecture"}:
        value = _long_reference(value, where)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"`{where}` must be a model path")
    try:
        split_reference(value)
    except ConfigError as exc:
        raise ConfigError(f"`{where}`: {exc}") from None
    return value


def _long_reference(value: dict[str, Any], where: str) -> str:
    """mergekit's long form {model: M, lora: A} as the short one, M+A. M and A may each be a path
    or mergekit's {path: P, revision: R}, the form mergekit writes into an output's
    mergekit_config.yml for a path with a space. `override_architecture` changes nothing here:
    fastmerge plans from the tensors a model has, not from its architecture's name."""
    model = _model_path(value["model"], f"{where}.model")
    if value.get("lora") is None:
        return model
    lora = _model_path(value["lora"], f"{where}.lora")
    if "+" in model or "+" in lora:
        raise ConfigError(f"`{where}`: `model` and `lora` must be paths without '+'")
    return f"{model}+{lora}"


def _model_path(value: Any, where: str) -> str:
    """A path, or {path: P, revision: R}: P, or P@R for a Hub repository (mergekit, too, reads a
    revision only from the Hub)."""
    if isinstance(value, dict) and "path" in value and set(value) <= {"path", "revision"}:
        path, revision = value["path"], value.get("revision")
        if not isinstance(path, str) or not path or not (revision is None or isinstance(revision, str) and revision):
            raise ConfigError(f"`{where}`: `path` must be a path and `revision` a branch, tag or commit")
        return path if revision is None or Path(path).expanduser().exists() else f"{path}@{revision}"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"`{where}` must be a path or {{path: ..., revision: ...}}")
    return value


def check_keys(entry: dict[str, Any], allowed: set[str], where: str) -> None:
    """Unknown keys are errors: a misspelt key would otherwise be silently ignored."""
    for key in entry:
        if key not in allowed:
            raise ConfigError(f"unknown key `{where}.{key}`; allowed: {', '.join(sorted(allowed))}")


def _parse_source(entry: Any, where: str, with_range: bool) -> SourceSpec:
    if isinstance(entry, str) and not with_range:
        entry = {"model": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"`{where}` must be a mapping with a `model` key")
    check_keys(entry, {"model", "parameters", "layer_range"} if with_range else {"model", "parameters"}, where)
    model = model_reference(entry.get("model"), f"{where}.model")
    if model is None:
        raise ConfigError(f"`{where}.model` is required")
    layer_range = None
    if with_range:
        layer_range = entry.get("layer_range")
        if (
            not isinstance(layer_range, (list, tuple))
            or len(layer_range) != 2
            or not all(is_integer(v) for v in layer_range)
            or not 0 <= layer_range[0] < layer_range[1]
        ):
            raise ConfigError(f"`{where}.layer_range` must be [start, end) with 0 <= start < end, got {layer_range!r}")
        layer_range = (layer_range[0], layer_range[1])
    return SourceSpec(model=model, parameters=_parse_parameters(entry.get("parameters"), f"{where}.parameters"), layer_range=layer_range)


def _parse_slice(entry: Any, where: str) -> SliceSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"`{where}` must be a mapping with `sources`")
    check_keys(entry, {"sources", "base_model", "parameters", "residual_weight"}, where)
    if entry.get("residual_weight") is not None:
        raise ConfigError(f"`{where}.residual_weight` is not supported")
    sources = entry.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"`{where}.sources` must be a non-empty list")
    parsed = [_parse_source(s, f"{where}.sources[{i}]", with_range=True) for i, s in enumerate(sources)]
    lengths = {s.layer_range[1] - s.layer_range[0] for s in parsed}
    if len(lengths) != 1:
        raise ConfigError(f"`{where}`: every source must cover the same number of layers, got lengths {sorted(lengths)}")
    return SliceSpec(
        sources=parsed,
        base_model=model_reference(entry.get("base_model"), f"{where}.base_model"),
        parameters=_parse_parameters(entry.get("parameters"), f"{where}.parameters"),
    )


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _parse_parameters(params: Any, where: str) -> dict[str, ParameterSetting]:
    """Check every setting's shape now, so evaluation later cannot meet a malformed value. A
    parameter set to null is one not given: its default holds (RECALL's `sigma: null`)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(f"`{where}` must be a mapping of parameter names to values")
    return {name: _parse_setting(value, f"{where}.{name}") for name, value in params.items() if value is not None}


def _parse_setting(value: Any, where: str) -> ParameterSetting:
    if _is_scalar(value):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value:
        if all(_is_scalar(v) for v in value):
            return list(value)
        if all(isinstance(v, dict) for v in value):
            conditions = []
            for i, cond in enumerate(value):
                check_keys(cond, {"filter", "value"}, f"{where}[{i}]")
                if "value" not in cond:
                    raise ConfigError(f"`{where}[{i}]` needs a `value`")
                filt = cond.get("filter")
                if filt is not None and not isinstance(filt, str):
                    raise ConfigError(f"`{where}[{i}].filter` must be a string")
                inner = cond["value"]
                if not (_is_scalar(inner) or (isinstance(inner, list) and inner and all(_is_scalar(v) for v in inner))):
                    raise ConfigError(f"`{where}[{i}].value` must be a number, a string or a gradient list")
                conditions.append(Conditional(value=inner, filter=filt))
            return conditions
    raise ConfigError(
        f"`{where}` must be a scalar, a gradient list of numbers, or a list of {{filter, value}} entries; got {value!r}"
    )


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float) -> Any:
    """The value of one setting for one tensor at relative depth t in [0, 1].

    Filter lists pick the first entry whose filter is a substring of the tensor name (no match:
    None). Numeric gradients interpolate piecewise-linearly over t; gradients with non-numeric
    entries select the entry at floor(t * (n - 1)), as mergekit does.
    """
    if isinstance(setting, list) and setting and isinstance(setting[0], Conditional):
        for cond in setting:
            if cond.matches(tensor_name):
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    if isinstance(setting, list):
        if len(setting) == 1:
            return setting[0]
        numeric = all(is_number(v) for v in setting)
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        if not numeric:
            return setting[low]
        high = min(len(setting) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * setting[low] + frac * setting[high]
    return setting
