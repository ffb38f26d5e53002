"""The `fastmerge` and `fastmerge-yaml` commands as a user types them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from _support import load_dir, write_config
from fastmerge import merge_tensors as fastmerge_merge
from fastmerge.cli import main, mergekit_yaml_main


def config_for(models, method="task_arithmetic"):
    return {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[n]), "parameters": {"weight": 0.5}} for n in ("ft1", "ft2")],
    }


def test_run_prints_report(tiny_models, tmp_path, capsys):
    path = write_config(tmp_path / "m.yml", config_for(tiny_models))
    assert main(["run", str(path), str(tmp_path / "out"), "--quiet", "--out-shard-size", "30K", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "merged" in out and "task_arithmetic" in out and "peak RSS" in out
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1


def test_plan_writes_nothing(tiny_models, tmp_path, capsys):
    path = write_config(tmp_path / "m.yml", config_for(tiny_models))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "task_arithmetic" in out and "tensors:" in out and "est. peak mem" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_mergekit_yaml_drop_in_flags(tiny_models, tmp_path, capsys):
    path = write_config(tmp_path / "m.yml", config_for(tiny_models))
    code = mergekit_yaml_main([
        str(path), str(tmp_path / "out"), "--no-copy-tokenizer", "--lazy-unpickle", "--low-cpu-memory",
        "--allow-crimes", "--no-write-model-card", "--random-seed", "3", "-j", "1", "--out-shard-size", "1B",
    ])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--lazy-unpickle accepted and ignored" in err
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    reference = tmp_path / "ref"
    assert main(["run", str(path), str(reference), "--quiet"]) == 0
    produced, expected = load_dir(tmp_path / "out"), load_dir(reference)
    assert all(torch.equal(produced[k], expected[k]) for k in expected)


def test_every_mergekit_yaml_flag_is_accepted(tiny_models, tmp_path, capsys):
    """mergekit 0.1.5's whole flag list (`mergekit-yaml --help`), so scripts written for it run."""
    path = write_config(tmp_path / "m.yml", config_for(tiny_models))
    code = mergekit_yaml_main([
        str(path), str(tmp_path / "out"), "--no-allow-crimes", "--no-unsafe-truncate-embeddings", "--no-trust-remote-code",
        "--transformers-cache", str(tmp_path / "cache"), "--lora-merge-cache", str(tmp_path / "lora"), "--lora-merge-dtype", "float32",
        "--random-seed", "1", "-v", "--no-quiet", "--no-cuda", "--device", "cpu", "--no-low-cpu-memory", "--no-lazy-unpickle",
        "--no-read-to-gpu", "--multi-gpu", "-j", "1", "--no-async-write", "--write-threads", "2", "--out-shard-size", "1B",
        "--copy-tokenizer", "--no-clone-tensors", "--no-write-model-card", "--safe-serialization",
    ])
    err = capsys.readouterr().err
    assert code == 0, err
    for flag in ("--transformers-cache", "--multi-gpu", "--write-threads"):
        assert f"{flag} accepted and ignored" in err
    for flag in ("--allow-crimes", "--trust-remote-code", "--write-model-card"):  # their --no- forms: no note
        assert flag not in err
    assert mergekit_yaml_main([str(path), str(tmp_path / "remote"), "--trust-remote-code"]) == 0
    assert "--trust-remote-code accepted and ignored (fastmerge never runs model code)" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    assert mergekit_yaml_main([str(path), str(tmp_path / "gpu"), "--gpu-rich"]) == (0 if torch.cuda.is_available() else 2)
    if not torch.cuda.is_available():
        assert "--device cuda was asked for" in capsys.readouterr().err


def test_mergekit_yaml_errors_exit_2(tmp_path, capsys):
    path = write_config(tmp_path / "m.yml", {"merge_method": "linear", "models": [{"model": str(tmp_path / "missing"), "parameters": {"weight": 1}}]})
    assert mergekit_yaml_main([str(path), str(tmp_path / "out")]) == 2
    assert "missing" in capsys.readouterr().err


def test_demo_builds_and_merges(tmp_path):
    # `python -m fastmerge` is the console script's path (fastmerge.console): it leaves with
    # os._exit, so this also checks that the summary on a piped stdout was flushed first.
    result = subprocess.run([sys.executable, "-m", "fastmerge", "demo", str(tmp_path / "demo"), "--quiet"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    merged = tmp_path / "demo" / "merged"
    assert "merged" in result.stdout and (merged / "model.safetensors").exists()
    tensors = load_dir(merged)
    base = load_dir(tmp_path / "demo" / "models" / "base")
    assert tensors.keys() == base.keys()
    assert not torch.equal(tensors["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_demo_leaves_a_directory_of_the_users_alone(tmp_path, capsys):
    """The demo writes models/, merge.yml and merged/ and replaces them when run again, so a
    directory it did not make (not empty) is refused; its own is reused."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "merge.yml").write_text("my config")
    assert main(["demo", str(mine), "--quiet"]) == 2
    assert "not empty and no earlier `fastmerge demo` made it" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["merge.yml"] and (mine / "merge.yml").read_text() == "my config"
    demo = tmp_path / "demo"
    assert main(["demo", str(demo), "--quiet"]) == 0 and main(["demo", str(demo), "--quiet"]) == 0
    assert (demo / "merged" / "model.safetensors").exists()


def test_console_scripts_exit_2_on_bad_input(tmp_path):
    bad = write_config(tmp_path / "m.yml", {"merge_method": "linear", "models": [{"model": str(tmp_path / "missing"), "parameters": {"weight": 1}}]})
    scripts = {
        "fastmerge": [sys.executable, "-m", "fastmerge", "run", str(bad), str(tmp_path / "out")],
        "fastmerge-yaml": [sys.executable, "-c", "import sys; from fastmerge.console import fastmerge_yaml; sys.argv[0] = 'fastmerge-yaml'; fastmerge_yaml()",
                           str(bad), str(tmp_path / "out")],
        "fastmerge-pytorch": [sys.executable, "-c", "import sys; from fastmerge.console import fastmerge_pytorch; sys.argv[0] = 'fastmerge-pytorch'; fastmerge_pytorch()",
                              str(bad), str(tmp_path / "out")],
    }
    for name, command in scripts.items():
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 2, (name, result.stderr)
        assert "missing" in result.stderr and "Traceback" not in result.stderr, name
        assert not (tmp_path / "out").exists()


def test_continual_merges_after_each_step(tiny_models, tmp_path, capsys):
    out = tmp_path / "steps"
    code = main([
        "continual", str(out), str(tiny_models["ft1"]), str(tiny_models["ft2"]), str(tiny_models["ft3"]),
        "--method", "task_arithmetic", "--base", str(tiny_models["base"]), "--model-param", "weight=0.5", "--quiet",
    ])
    assert code == 0, capsys.readouterr().err
    steps = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(steps) == 3
    base = load_dir(tiny_models["base"])
    ft3 = load_dir(tiny_models["ft3"])
    previous = load_dir(tmp_path / steps[1])
    last = load_dir(tmp_path / steps[2])
    name = "model.layers.0.mlp.up_proj.weight"
    expected = fastmerge_merge("task_arithmetic", [previous[name], ft3[name]], base=base[name], weight=0.5)
    assert torch.equal(last[name], expected)


def test_continual_bad_param_exits_2(tiny_models, tmp_path, capsys):
    code = main(["continual", str(tmp_path / "o"), str(tiny_models["ft1"]), "--method", "linear", "--param", "novalue", "--quiet"])
    assert code == 2 and "KEY=VALUE" in capsys.readouterr().err


# Run in a child process: the signal goes to the process itself, from inside the merge, once
# every tensor is written and the output is about to be moved into place.
_SIGNALLED_MERGE = """
import os, signal, sys, time
from fastmerge.cli import main
from fastmerge.io import output_dir

sent = signal.Signals[sys.argv[1]]
if sys.argv[2] == "ignored":
    signal.signal(sent, signal.SIG_IGN)  # as nohup leaves SIGHUP
commit = output_dir.StagedOutput.commit

def signalled_commit(self):
    if sys.argv[2] == "after":  # the output is in place when the signal comes
        commit(self)
    os.kill(os.getpid(), sent)
    time.sleep(0.5)  # a handled signal raises in here
    return commit(self)

output_dir.StagedOutput.commit = signalled_commit
if sys.argv[2] == "twice":  # the same signal again while the staged output is being deleted
    discard = output_dir.StagedOutput.discard

    def signalled_discard(self):
        os.kill(os.getpid(), sent)
        time.sleep(0.5)
        return discard(self)

    output_dir.StagedOutput.discard = signalled_discard
sys.exit(main(["run", sys.argv[3], sys.argv[4], "--quiet"]))
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGINT"])
@pytest.mark.parametrize("times", ["once", "twice"])
def test_a_stopped_merge_leaves_no_output(tiny_models, tmp_path, name, times):
    config = write_config(tmp_path / "m.yml", config_for(tiny_models))
    out = tmp_path / "out" / "merged"
    result = subprocess.run([sys.executable, "-c", _SIGNALLED_MERGE, name, times, str(config), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.Signals[name], result.stderr
    assert "the output in progress was discarded" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # neither the output, its hidden staging directory nor the parent made for it


def test_a_merge_stopped_after_its_commit_says_the_output_is_in_place(tiny_models, tmp_path):
    config = write_config(tmp_path / "m.yml", config_for(tiny_models))
    out = tmp_path / "out" / "merged"
    result = subprocess.run([sys.executable, "-c", _SIGNALLED_MERGE, "SIGTERM", "after", str(config), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert f"stopped by SIGTERM; the finished output is in place at {out}" in result.stderr
    assert (out / "model.safetensors").exists() and [p.name for p in out.parent.iterdir()] == ["merged"]


def test_an_ignored_hangup_is_left_ignored(tiny_models, tmp_path):
    config = write_config(tmp_path / "m.yml", config_for(tiny_models))
    out = tmp_path / "out" / "merged"
    result = subprocess.run([sys.executable, "-c", _SIGNALLED_MERGE, "SIGHUP", "ignored", str(config), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").exists()


def test_ctrl_c_while_torch_loads_is_one_line():
    """The console script imports torch before the CLI handles signals; Ctrl-C then (its first
    second or more) used to print a traceback. An import hook raises it there deterministically."""
    interrupted_import = """
import sys

class Interrupt:
    def find_spec(self, name, path, target=None):
        if name == "torch":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupt())
sys.argv = ["fastmerge", "--version"]
from fastmerge.console import fastmerge
fastmerge()
"""
    done = subprocess.run([sys.executable, "-c", interrupted_import], capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGINT
    assert done.stderr == "fastmerge: interrupted before the command started; nothing was written\n"


def test_version_names_the_native_build_this_cpu_loads(capsys):
    from fastmerge import _native

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("fastmerge ") and out[1] == f"native kernels: {_native.__name__.rpartition('.')[2]}"


def test_version_says_why_no_native_build_is_usable():
    done = subprocess.run([sys.executable, "-m", "fastmerge", "--version"], capture_output=True, text=True,
                          env={**os.environ, "FASTMERGE_NATIVE_VARIANT": "_native_nonexistent"})
    assert done.returncode == 0
    assert "native kernels: none usable here (FASTMERGE_NATIVE_VARIANT='_native_nonexistent' is not a build" in done.stdout
