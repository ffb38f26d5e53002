"""The `fastmerge prune` config: which model, which data, which score, how sparse.

A YAML file (or dict) with these keys; only `model` and, for data-aware scores, `data` are
required:

    model: path/to/model            # Hugging Face directory (safetensors), or MODEL+ADAPTER:
                                    # a PEFT LoRA adapter applied first (as in merge configs)
    data:                           # .jsonl or .txt files (see fastmerge.pruning.data)
      domain: domain.jsonl          # the domain the pruned model must stay good at
      general: general.jsonl        # general text whose skills it should keep
    objective: causal_lm            # causal_lm (next-token loss) | contrastive (InfoNCE)
    pooling: mean                   # contrastive only: mean | last (token pooling)
    temperature: 0.05               # contrastive only: InfoNCE temperature
    score: gaprune                  # gaprune | fisher | magnitude | random
    sparsity: 0.5                   # fraction of targeted weights set to zero, in [0, 1)
    budget: global                  # global (one threshold over all targets) | per_tensor
    structure: unstructured         # unstructured | "2:4" (2 of every 4 kept, per row group)
    targets: [mlp]                  # name filters: `mlp`, `attention` (aliases) or substrings
    alpha: 0.2                      # GAPrune alignment weight (>= 0)
    beta: 1.0                       # GAPrune general-Fisher penalty (>= 0)
    gamma: 0.5                      # GAPrune sqrt-magnitude prior (>= 0)
    alignment: row_cosine           # row_cosine | sign (how gradient agreement s is measured)
    max_length: 128                 # tokens per sequence
    batch_size: 8
    num_batches: 16                 # batches per data set (fewer if the data runs out)
    seed: 0                         # for `random` and for shuffling nothing (data keep file order)
    dtype: float32                  # compute dtype of the statistics pass

Validation is strict (unknown keys are errors) for the same reason as merge configs: a typo
silently ignored would prune a different model than the one asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..config import parse_yaml
from ..errors import ConfigError
from ..io.lora import split_reference
from ..values import is_finite_number, is_integer

OBJECTIVES = ("causal_lm", "contrastive")
SCORES = ("gaprune", "fisher", "magnitude", "random")
DATA_FREE_SCORES = ("magnitude", "random")
STRUCTURES = ("unstructured", "2:4")
BUDGETS = ("global", "per_tensor")
POOLINGS = ("mean", "last")
ALIGNMENTS = ("row_cosine", "sign")
DTYPES = ("float32", "bfloat16")


@dataclass
class PruneConfig:
    """A validated prune config; see the module docstring for the meaning of each field."""

    model: Path
    adapter: Path | None = None  # a LoRA adapter applied to `model`
    domain_data: Path | None = None
    general_data: Path | None = None
    objective: str = "causal_lm"
    pooling: str = "mean"
    temperature: float = 0.05
    score: str = "gaprune"
    sparsity: float = 0.5
    budget: str = "global"
    structure: str = "unstructured"
    targets: list[str] = field(default_factory=lambda: ["mlp"])
    alpha: float = 0.2
    beta: float = 1.0
    gamma: float = 0.5
    alignment: str = "row_cosine"
    max_length: int = 128
    batch_size: int = 8
    num_batches: int = 16
    seed: int = 0
    dtype: str = "float32"

    @property
    def reference(self) -> str:
        """The model as merge configs name it (`io.lora.open_model` opens it)."""
        return str(self.model) + (f"+{self.adapter}" if self.adapter is not None else "")

    @property
    def needs_data(self) -> bool:
        return self.score not in DATA_FREE_SCORES


_KEYS = {
    "model", "data", "objective", "pooling", "temperature", "score", "sparsity", "budget", "structure",
    "targets", "alpha", "beta", "gamma", "alignment", "max_length", "batch_size", "num_batches", "seed", "dtype",
}


def load_prune_config(config: str | Path | Mapping[str, Any]) -> PruneConfig:
    """Parse a prune config from a dict or a YAML file; relative paths are relative to the file."""
    if isinstance(config, Mapping):
        return parse_prune_config(dict(config), Path.cwd())
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"prune config {path} does not exist")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a YAML mapping with at least `model`")
    return parse_prune_config(data, path.parent)


def parse_prune_config(data: dict[str, Any], root: Path) -> PruneConfig:
    """Validate a prune config dict; `root` anchors relative paths."""
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown prune config key {unknown[0]!r}; allowed keys: {', '.join(sorted(_KEYS))}")
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise ConfigError("prune config: `model` is required and must be a model directory path")
    cfg = PruneConfig(*_model_reference(root, data["model"]))
    for key, choices in (("objective", OBJECTIVES), ("pooling", POOLINGS), ("score", SCORES), ("budget", BUDGETS),
                         ("structure", STRUCTURES), ("alignment", ALIGNMENTS), ("dtype", DTYPES)):
        if key in data:
            value = str(data[key])
            if value not in choices:
                raise ConfigError(f"prune config: `{key}: {data[key]}` is not one of {', '.join(choices)}")
            setattr(cfg, key, value)
    for key in ("temperature", "sparsity", "alpha", "beta", "gamma"):
        if key in data:
            setattr(cfg, key, _number(data[key], key))
    for key in ("max_length", "batch_size", "num_batches", "seed"):
        if key in data:
            setattr(cfg, key, _integer(data[key], key, minimum=0 if key == "seed" else 1))
    if not 0.0 <= cfg.sparsity < 1.0:
        raise ConfigError(f"prune config: `sparsity` must be in [0, 1) (fraction of weights removed), got {cfg.sparsity}")
    if cfg.structure == "2:4" and cfg.sparsity != 0.5:
        raise ConfigError(f"prune config: `structure: 2:4` removes exactly half of each group; set `sparsity: 0.5`, got {cfg.sparsity}")
    if cfg.temperature <= 0:
        raise ConfigError(f"prune config: `temperature` must be positive, got {cfg.temperature}")
    for key in ("alpha", "beta", "gamma"):
        # DAI's terms only mean what they say with non-negative weights: a negative alpha rewards
        # gradient disagreement, a negative beta general-data importance, and a negative gamma
        # ranks large weights below small ones (pruning the biggest first).
        if getattr(cfg, key) < 0:
            raise ConfigError(f"prune config: `{key}` must be >= 0 (a weight in the GAPrune score), got {getattr(cfg, key)}")
    if "targets" in data:
        targets = data["targets"]
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError("prune config: `targets` must be a non-empty list of name filters such as [mlp]")
        cfg.targets = list(targets)
    _parse_data(cfg, data.get("data"), root)
    return cfg


def _parse_data(cfg: PruneConfig, data: Any, root: Path) -> None:
    if data is None:
        if cfg.needs_data:
            raise ConfigError(f"prune config: score {cfg.score} needs `data: {{domain: FILE, general: FILE}}`")
        return
    if not isinstance(data, dict) or set(data) - {"domain", "general"}:
        raise ConfigError("prune config: `data` must be a mapping with `domain` and `general` file paths")
    for key in ("domain", "general"):
        value = data.get(key)
        if value is None:
            if cfg.needs_data and (key == "domain" or cfg.score == "gaprune"):
                raise ConfigError(f"prune config: score {cfg.score} needs `data.{key}`")
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f"prune config: `data.{key}` must be a file path")
        setattr(cfg, f"{key}_data", _path(root, value))


def _model_reference(root: Path, value: str) -> tuple[Path, Path | None]:
    """(model, adapter) of `model: PATH` or `model: MODEL+ADAPTER`, both relative to `root`."""
    whole = _path(root, value)
    if whole.exists():
        return whole, None
    model, adapter = split_reference(value)
    return _path(root, model), (_path(root, adapter) if adapter is not None else None)


def _path(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def _number(value: Any, key: str) -> float:
    """A finite number: NaN passes every range check below and inf overflows the scores."""
    if not is_finite_number(value):
        raise ConfigError(f"prune config: `{key}` must be a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, key: str, minimum: int) -> int:
    if not is_integer(value) or value < minimum:
        raise ConfigError(f"prune config: `{key}` must be an integer >= {minimum}, got {value!r}")
    return value
