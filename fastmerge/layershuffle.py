"""Random layer stacks (`fastmerge layershuffle`, `fastmerge-layershuffle`): mergekit-layershuffle's
passthrough configs, seeded.

mergekit-layershuffle 0.1.5 stops on every model before it builds anything (it asks its
architecture object for `num_layers`, which no longer exists), so what it builds is taken from
its flags and its help:

- by default, output layer i is layer i of a model drawn for it, with probability proportional
  to the models' `--weight` (equal without any); runs of layers drawn from the same model are
  one slice;
- with `--full-random` each model gives int(its layer count x its weight) layers, each one a
  layer drawn uniformly from all of that model's layers, and the slices are shuffled.

The draws come from Python's `random.Random(seed)` (mergekit seeds Python's generator with
--random-seed), so a seed always gives the same config.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from .errors import ConfigError


def shuffle_config(models: Sequence[str], layer_counts: Sequence[int], weights: Sequence[float] = (), *,
                   full_random: bool = False, seed: int = 0, fp16: bool = False) -> dict[str, Any]:
    """A passthrough config stacking layers of `models` (each with `layer_counts[i]` layers; the
    output has as many as the first model unless `full_random`), drawn as the module docstring says."""
    if not models:
        raise ConfigError("--model: give at least one model")
    if weights and len(weights) != len(models):
        raise ConfigError(f"--weight: {len(weights)} values for {len(models)} models; give one per model, or none")
    if any(w < 0 for w in weights):
        raise ConfigError(f"--weight: {min(weights)} is negative; weights are relative odds (or, with --full-random, "
                          "fractions of a model's layers)")
    for model, layers in zip(models, layer_counts):
        if layers < 1:
            raise ConfigError(f"{model}: no layers found (no num_hidden_layers in config.json and no numbered layers)")
    rng = random.Random(seed)
    if full_random:
        if not weights:
            raise ConfigError("--full-random needs one --weight per model: the fraction of its layers it gives")
        slices = [(model, index) for model, layers, fraction in zip(models, layer_counts, weights)
                  for index in (rng.randrange(layers) for _ in range(int(layers * fraction)))]
        rng.shuffle(slices)
        ranges = [[model, index, index + 1] for model, index in slices]
        if not ranges:
            raise ConfigError("--full-random: the weights give no layers at all (int(layers x weight) is 0 for every model)")
    else:
        if weights and sum(weights) <= 0:
            raise ConfigError("--weight: at least one weight must be positive")
        ranges = []
        for index in range(layer_counts[0]):
            model = rng.choices(models, weights=weights or None)[0]
            if ranges and ranges[-1][0] == model:
                ranges[-1][2] = index + 1
            else:
                ranges.append([model, index, index + 1])
    config: dict[str, Any] = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": model, "layer_range": [start, end]}]} for model, start, end in ranges],
    }
    if fp16:
        config["dtype"] = "float16"
    return config
