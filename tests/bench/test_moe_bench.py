"""The MoE build benchmark on a small set: each gate mode's config, the build, the figures line."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("transformers")

from bench import moe  # noqa: E402
from fastmerge.io.checkpoint import Checkpoint  # noqa: E402


@pytest.mark.parametrize("gate_mode", ["random", "hidden"])
def test_the_benchmark_builds_the_moe(tmp_path, capsys, gate_mode):
    moe.main(["--custom", "64,160,2,4,2,96", "--fine-tunes", "2", "--work", str(tmp_path), "--no-mergekit",
              "--gate-mode", gate_mode])
    config = yaml.safe_load((tmp_path / "moe-custom.yml").read_text())
    assert config["gate_mode"] == gate_mode and len(config["experts"]) == 3
    assert all(("positive_prompts" in e) == (gate_mode == "hidden") for e in config["experts"])
    out = Checkpoint(tmp_path / "moe-custom-fastmerge")
    assert tuple(out.info("model.layers.1.mlp.gate.weight").shape) == (3, 64)
    assert "3 experts" in capsys.readouterr().out
