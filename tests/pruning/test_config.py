from pathlib import Path

import pytest

from fastmerge.errors import ConfigError
from fastmerge.pruning.config import load_prune_config


def test_defaults_and_relative_paths(tmp_path: Path):
    config = tmp_path / "prune.yml"
    config.write_text("model: m\ndata: {domain: d.jsonl, general: g.txt}\n")
    cfg = load_prune_config(config)
    assert (cfg.model, cfg.domain_data, cfg.general_data) == (tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "g.txt")
    assert (cfg.score, cfg.sparsity, cfg.targets, cfg.alpha, cfg.beta, cfg.gamma) == ("gaprune", 0.5, ["mlp"], 0.2, 1.0, 0.5)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model": "m", "score": "magnitude", "sparsity": 1.0}, "sparsity"),
        ({"model": "m", "score": "magnitude", "sparsity": -0.1}, "sparsity"),
        ({"model": "m", "score": "magnitude", "sparsty": 0.5}, "sparsty"),
        ({"model": "m", "score": "gaprune", "data": {"domain": "d"}}, "data.general"),
        ({"model": "m", "score": "fisher"}, "needs `data"),
        ({"model": "m", "score": "nope"}, "score"),
        ({"model": "m", "score": "magnitude", "structure": "2:4", "sparsity": 0.7}, "2:4"),
        ({"model": "m", "score": "magnitude", "targets": []}, "targets"),
        ({"model": "m", "score": "magnitude", "alpha": float("inf")}, "`alpha` must be a finite number"),
        ({"model": "m", "score": "magnitude", "beta": float("nan")}, "`beta` must be a finite number"),
        ({"model": "m", "score": "magnitude", "temperature": float("nan")}, "`temperature` must be a finite number"),
        ({"model": "m", "score": "magnitude", "gamma": -5}, r"`gamma` must be >= 0"),
        ({"model": "m", "score": "magnitude", "alpha": -0.2}, r"`alpha` must be >= 0"),
        ({"model": "m", "score": "magnitude", "beta": -1}, r"`beta` must be >= 0"),
    ],
)
def test_bad_configs_name_the_key(config, message):
    with pytest.raises(ConfigError, match=message):
        load_prune_config(config)
