"""`fastmerge continual` checks its arguments, models and samples files before creating OUT, and
leaves no empty OUT behind when a run fails before its first step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastmerge.cli import main


def _continual(out: Path, checkpoints: list[Path], *options: str) -> list[str]:
    return ["continual", str(out), *(str(c) for c in checkpoints), *options, "--quiet"]


def _samples(tmp_path: Path) -> Path:
    path = tmp_path / "samples.txt"
    path.write_text("the first task text\nmore of the first task\n")
    return path


@pytest.mark.parametrize("case, message", [
    ("missing model", "nope"),
    ("unknown param", "parameters.foo"),
    ("ties without base", "needs a `base_model`"),
    ("float64", "float64"),
    ("samples with linear", "merge_method linear reads no samples"),
    ("single checkpoint", "one checkpoint .* without a base has nothing to merge"),
    ("missing third samples file", "samples file .*missing.txt does not exist"),
    ("missing first samples file", "samples file .*missing.txt does not exist"),
])
def test_bad_input_exits_2_before_out_is_created(tiny_models, tmp_path, capsys, case, message):
    ft1, ft2, ft3 = (tiny_models[f"ft{i}"] for i in (1, 2, 3))
    samples, missing = str(_samples(tmp_path)), str(tmp_path / "missing.txt")
    linear = ("--method", "linear", "--model-param", "weight=0.5")
    checkpoints, options = {
        "missing model": ([ft1, tmp_path / "nope"], linear),
        "unknown param": ([ft1, ft2], (*linear, "--param", "foo=1")),
        "ties without base": ([ft1, ft2], ("--method", "ties", "--model-param", "weight=0.5")),
        "float64": ([ft1, ft2], (*linear, "--dtype", "float64")),
        "samples with linear": ([ft1, ft2], (*linear, "--samples", samples, samples)),
        "single checkpoint": ([ft1], linear),
        "missing third samples file": ([ft1, ft2, ft3], ("--samples", samples, samples, missing)),
        "missing first samples file": ([ft1, ft2], ("--samples", missing, samples)),
    }[case]
    out = tmp_path / "out"
    assert main(_continual(out, checkpoints, *options)) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmerge: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_out_inside_an_input_is_not_created_on_bad_input(tiny_models, tmp_path):
    out = tiny_models["ft1"] / "continual"
    assert main(_continual(out, [tiny_models["ft1"], tiny_models["ft2"]], "--method", "ties", "--model-param", "weight=0.5")) == 2
    assert not out.exists()


def test_a_failure_before_the_first_step_removes_the_out_it_created(tiny_models, tmp_path):
    """num_typical=0 is only refused when the RECALL step prepares (after OUT exists)."""
    samples = str(_samples(tmp_path))
    out = tmp_path / "new" / "out"
    code = main(_continual(out, [tiny_models["ft1"], tiny_models["ft2"]], "--samples", samples, samples,
                           "--param", "num_typical=0"))
    assert code == 2
    assert not (tmp_path / "new").exists()


def test_a_failure_leaves_an_existing_out_in_place(tiny_models, tmp_path):
    samples = str(_samples(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    code = main(_continual(out, [tiny_models["ft1"], tiny_models["ft2"]], "--samples", samples, samples,
                           "--param", "num_typical=0"))
    assert code == 2 and out.is_dir()


def test_one_checkpoint_with_a_base_writes_step_01(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(_continual(out, [tiny_models["ft1"]], "--base", str(tiny_models["base"]), "--method", "task_arithmetic",
                           "--model-param", "weight=1.0"))
    assert code == 0, capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["step_01"]
