"""The GPU kernel benchmark's own logic: its figures, its targets and its reference checks, run
here on CPU tensors with the Triton kernels in the interpreter (`--device cpu`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from _support import REPO, old_triton_interpreter
from bench import gpu_kernels


@pytest.mark.skipif(bool(old_triton_interpreter()), reason=old_triton_interpreter() or "-")
def test_cpu_run_measures_every_kernel_and_checks_it_against_the_reference(tmp_path):
    n, out = 4099, tmp_path / "figures.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_kernels", "--device", "cpu", "--n", str(n),
                           "--rbf", "2,5,7,16", "--repeat", "1", "--check-n", "3001", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert (figures["n"], figures["check_n"]) == (n, 3001)
    kernels = {f["name"]: f for f in figures["kernels"]}
    assert list(kernels) == ["copy", "blend", "threshold", "ties", "dare_ties"]
    assert all(f["matches_reference"] for f in kernels.values())
    # One read of the inputs and one write of the output, in bf16: K = 4 inputs (+ the base).
    assert [kernels[k]["bytes"] for k in ("copy", "blend", "threshold", "ties", "dare_ties")] == \
        [2 * 4 * n * 2, 5 * n * 2, 2 * n * 2, 6 * n * 2, 6 * n * 2]
    copy_gbps = kernels["copy"]["gbps"]
    for f in kernels.values():
        assert f["gbps"] == pytest.approx(f["bytes"] / f["seconds"] / 1e9)
        if f["name"] != "copy":
            assert f["share_of_copy"] == pytest.approx(f["gbps"] / copy_gbps)
    assert kernels["ties"]["backend"] == "triton, native selection"
    rbf = figures["rbf"]
    assert rbf["shape"] == [2, 5, 7, 16] and rbf["matches_reference"]
    assert rbf["tflops"] == pytest.approx(2 * 2 * 5 * 7 * 16 / rbf["seconds"] / 1e12)
    assert "| blend | triton |" in done.stdout and "torch.cdist + exp" in done.stdout


def test_a_kernel_meets_its_target_by_its_share_of_the_copy_bandwidth():
    at = gpu_kernels.kernel_figure("blend", "triton", 1.0, 8_000_000_000, 10.0, True)
    below = gpu_kernels.kernel_figure("blend", "triton", 1.0, 7_900_000_000, 10.0, True)
    untargeted = gpu_kernels.kernel_figure("threshold", "cuda", 1.0, 1_000_000_000, 10.0, False)
    assert (at.gbps, at.share_of_copy, at.target, at.met) == (8.0, 0.8, 0.8, True)
    assert below.met is False and untargeted.target is None and untargeted.met is None
    rbf = gpu_kernels.RbfFigure([1, 2, 3, 4], 1.0, 1.0, 2.0, 0.5, 2.0, 1e-3, False)
    table = gpu_kernels.report([at, below, untargeted], rbf, torch.device("cpu"))
    assert ">= 0.80 met" in table and ">= 0.80 MISSED" in table
    assert "| threshold | cuda |" in table and "| NO |" in table and "OUTSIDE 1e-06" in table


@pytest.mark.parametrize("argv", [["--rbf", "1,2,3"], ["--rbf", "a,b,c,d"], ["--n", "0"], ["--repeat", "0"], ["--check-n", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_kernels.parse_args(argv)
    assert exc.value.code == 2 and "--" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_without_a_gpu_says_so_and_exits_2(capsys):
    assert gpu_kernels.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
