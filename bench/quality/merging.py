"""Which merge methods the benchmark runs, with what small hyper-parameter grid, and how.

The method list comes from `fastmerge.methods.method_names()` at run time, so methods that land
later join the table on the next run. `GRIDS` documents the grid searched per method (chosen on
the validation split, never on test); a registered method missing from it runs once with its
defaults (plus weight 1 per model where the method requires weights). Each merge is a plain
`fastmerge.run` of a mergekit-style config, exactly what a user would write.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _product(**axes: list[Any]) -> list[dict[str, Any]]:
    """Every combination of the given parameter values, as dicts."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


@dataclass(frozen=True)
class MethodGrid:
    """Hyper-parameter grid for one method.

    global_grid: method-level `parameters:` to try; model_params: given to every model entry
    (the product with the global grid is searched). max_models: the most fine-tunes the method
    can merge at once (slerp-style methods take one model beside the base); None = any.
    samples: pass the newest task's training prompts as `parameters.samples` (data-aware methods).
    """

    global_grid: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    model_grid: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    max_models: int | None = None
    samples: bool = False

    def points(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return list(itertools.product(self.global_grid, self.model_grid))


_WEIGHT_1 = [{"weight": 1.0}]
_LAMBDAS = [0.5, 1.0]

GRIDS: dict[str, MethodGrid] = {
    "linear": MethodGrid(model_grid=_WEIGHT_1),
    "task_arithmetic": MethodGrid(global_grid=_product(**{"lambda": [0.3, 0.5, 0.8, 1.0]}), model_grid=_WEIGHT_1),
    "ties": MethodGrid(global_grid=_product(**{"lambda": _LAMBDAS}), model_grid=_product(weight=[1.0], density=[0.2, 0.5])),
    "dare_ties": MethodGrid(global_grid=_product(**{"lambda": _LAMBDAS}), model_grid=_product(weight=[1.0], density=[0.3, 0.6])),
    "dare_linear": MethodGrid(global_grid=_product(**{"lambda": _LAMBDAS}), model_grid=_product(weight=[1.0], density=[0.3, 0.6])),
    "breadcrumbs": MethodGrid(global_grid=_product(**{"lambda": _LAMBDAS}), model_grid=_product(weight=[1.0], density=[0.9], gamma=[0.01])),
    "breadcrumbs_ties": MethodGrid(global_grid=_product(**{"lambda": _LAMBDAS}), model_grid=_product(weight=[1.0], density=[0.9], gamma=[0.01])),
    "della": MethodGrid(global_grid=_product(**{"lambda": _LAMBDAS}), model_grid=_product(weight=[1.0], density=[0.5], epsilon=[0.1])),
    "della_linear": MethodGrid(global_grid=_product(**{"lambda": _LAMBDAS}), model_grid=_product(weight=[1.0], density=[0.5], epsilon=[0.1])),
    "multislerp": MethodGrid(model_grid=_WEIGHT_1),
    "nuslerp": MethodGrid(model_grid=_WEIGHT_1, max_models=2),
    "slerp": MethodGrid(global_grid=[{"t": 0.5}], max_models=1),
    "nearswap": MethodGrid(global_grid=[{"t": 0.01}], max_models=1),
    "arcee_fusion": MethodGrid(max_models=1),
    # Passthrough copies one model: not a merge of several fine-tunes.
    "passthrough": MethodGrid(max_models=0),
    "fda": MethodGrid(global_grid=_product(**{"lambda": [0.3, 1.0], "ridge": [0.01, 0.1]}), model_grid=_WEIGHT_1),
    "recall": MethodGrid(global_grid=_product(temperature=[0.05, 0.2, 1.0]), samples=True),
}


def grid_for(method: str) -> MethodGrid:
    """The documented grid, or one default run (weight 1 per model if the method needs weights)."""
    if method in GRIDS:
        return GRIDS[method]
    from fastmerge.methods import get_method

    needs_weight = "weight" in get_method(method).required_model_params
    return MethodGrid(model_grid=_WEIGHT_1 if needs_weight else [{}])


def available_methods() -> list[str]:
    """Every merge method fastmerge has registered right now."""
    from fastmerge.methods import method_names

    return method_names()


def applicable(method: str, n_models: int) -> bool:
    limit = grid_for(method).max_models
    return limit is None or n_models <= limit


def merge_config(method: str, base: Path, models: list[Path], global_params: dict[str, Any],
                 model_params: dict[str, Any], samples: Path | None) -> dict[str, Any]:
    """A mergekit-style config merging `models` (fine-tunes of `base`) with `method`."""
    from fastmerge.methods import get_method

    params = dict(global_params)
    if grid_for(method).samples:
        params["samples"] = str(samples)
    config: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": str(m), "parameters": dict(model_params)} for m in models],
        "parameters": params,
        "dtype": "float32",
    }
    if get_method(method).uses_base:
        config["base_model"] = str(base)
    return config


def run_merge(config: dict[str, Any], out_dir: Path, seed: int) -> Path:
    """Run one merge into `out_dir` (replacing it) and return the merged checkpoint directory."""
    import fastmerge

    return fastmerge.run(config, out_dir, overwrite=True, quiet=True, seed=seed, threads=2).output_dir
