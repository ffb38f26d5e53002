"""StagedOutput (atomic output directories) and copy_model_files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmerge.errors import CheckpointError, OutputError
from fastmerge.io import output_dir
from fastmerge.io.output_dir import StagedOutput, copy_model_files


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".fastmerge-" in p.name)


def test_commit_moves_the_output_into_place(tmp_path):
    dest = tmp_path / "out" / "merged"  # parent is created
    with StagedOutput(dest, inputs=[]) as staged:
        assert staged.path.parent == dest.parent
        assert staged.path.name.startswith(".merged.fastmerge-tmp-")
        (staged.path / "model.safetensors").write_text("x")
        assert not dest.exists()
        assert staged.commit() == dest.resolve()
    assert (dest / "model.safetensors").read_text() == "x"
    assert _leftovers(dest.parent) == []


def test_exception_deletes_the_temporary_directory(tmp_path):
    dest = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="boom"):
        with StagedOutput(dest, inputs=[]) as staged:
            (staged.path / "partial").write_text("x")
            raise RuntimeError("boom")
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_a_failure_removes_the_directories_made_for_the_output(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(RuntimeError):
        with StagedOutput(tmp_path / "a" / "b" / "c" / "merged", inputs=[]):
            raise RuntimeError("merge failed")
    assert list(tmp_path.iterdir()) == [tmp_path / "a"] and list((tmp_path / "a").iterdir()) == []


def test_leaving_without_commit_deletes_the_temporary_directory(tmp_path):
    with StagedOutput(tmp_path / "merged", inputs=[]):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_overwrite_replaces_the_old_output_only_after_success(tmp_path, monkeypatch, swap):
    """On Linux the old and the new output swap places in one renameat2 call, so the destination
    never lacks a complete output (no os.rename at all); elsewhere two renames do it."""
    if swap == "exchange":
        if not sys.platform.startswith("linux"):
            pytest.skip("renameat2 is Linux's")
        monkeypatch.setattr(output_dir.os, "rename", None)
    else:
        monkeypatch.setattr(output_dir, "_exchange", lambda first, second: False)
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "old.safetensors").write_text("old")
    with StagedOutput(dest, inputs=[], overwrite=True) as staged:
        assert (dest / "old.safetensors").exists()  # untouched while merging
        (staged.path / "new").write_text("new")
        staged.commit()
    assert [p.name for p in dest.iterdir()] == ["new"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("failing", [1, 2])
def test_a_failed_rename_leaves_the_old_output_in_place(tmp_path, monkeypatch, failing):
    monkeypatch.setattr(output_dir, "_exchange", lambda first, second: False)
    renames, real_rename = [], os.rename

    def rename(source, target):
        renames.append(target)
        if len(renames) == failing:
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    monkeypatch.setattr(output_dir.os, "rename", rename)
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "old.safetensors").write_text("old")
    with pytest.raises(OutputError, match="cannot move the finished output into place .*No space left"):
        with StagedOutput(dest, inputs=[], overwrite=True) as staged:
            staged.commit()
    assert (dest / "old.safetensors").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "old.safetensors").write_text("old")
    with pytest.raises(RuntimeError):
        with StagedOutput(dest, inputs=[], overwrite=True):
            raise RuntimeError("merge failed")
    assert (dest / "old.safetensors").read_text() == "old"


def killed(staged: StagedOutput) -> Path:
    """What a run killed outright (SIGKILL, the OOM killer) leaves: its staging directory, no
    longer locked (the kernel drops a dead process's locks)."""
    os.close(staged._lock)
    staged._lock = None
    return staged.path


def test_staging_directories_of_killed_runs_are_removed(tmp_path):
    """A killed run cannot remove its staging directory; the next run to the same output does,
    and says how many and how big. One that a live run holds stays, as do other outputs'."""
    dead = [killed(staged) for staged in [StagedOutput(tmp_path / "merged", inputs=[]) for _ in range(2)]]
    for leftover in dead:
        (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    other = killed(StagedOutput(tmp_path / "other", inputs=[]))
    with StagedOutput(tmp_path / "merged", inputs=[]) as alive:
        assert alive.notes == ["removed 2 staging directories that earlier runs, killed before they finished, left "
                               f"beside the output (1.95 KiB): {sorted(dead)[0]}, ..."]
        assert not any(d.exists() for d in dead) and other.exists()
        with StagedOutput(tmp_path / "merged", inputs=[]) as concurrent:
            assert concurrent.notes == [] and alive.path.exists()
    with StagedOutput(tmp_path / "fresh", inputs=[]) as staged:
        assert staged.notes == []


def test_a_staging_directory_that_cannot_be_opened_is_left_alone(tmp_path, monkeypatch):
    """Another user's, say: the merge goes on (os.open's PermissionError stopped it)."""
    theirs = killed(StagedOutput(tmp_path / "merged", inputs=[]))
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if Path(path) == theirs:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(output_dir.os, "open", refusing_open)
    with StagedOutput(tmp_path / "merged", inputs=[]) as staged:
        assert staged.notes == [] and theirs.exists()


def test_a_killed_run_is_cleaned_up_by_the_next(tiny_models, tmp_path):
    """For real: a merge killed with SIGKILL once its staging directory exists, then the same merge again."""
    config = tmp_path / "m.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_models['ft1']}\n    parameters: {{weight: 1.0}}\n")
    out = tmp_path / "out" / "merged"
    killed_merge = (
        "import os, signal, sys\n"
        "from fastmerge.cli import main\n"
        "from fastmerge.io import output_dir\n"
        "def die(self):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "output_dir.StagedOutput.commit = die\n"
        f"main(['run', {str(config)!r}, {str(out)!r}, '--quiet'])\n")
    done = subprocess.run([sys.executable, "-c", killed_merge], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL and len(_leftovers(out.parent)) == 1
    done = subprocess.run([sys.executable, "-m", "fastmerge", "run", str(config), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "note: removed 1 staging directory that earlier runs, killed before they finished, left" in done.stdout + done.stderr
    assert _leftovers(out.parent) == [] and (out / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["m" * 255, "x" + "é" * 127])  # 255 bytes; the second cut inside a character
def test_an_output_name_as_long_as_the_filesystem_allows(tmp_path, monkeypatch, name):
    """The hidden directories' names hold the output's name cut to 200 bytes: the whole of a
    name over 230 bytes made them too long to create."""
    monkeypatch.setattr(output_dir, "_exchange", lambda first, second: False)  # the longest names: two renames
    dest = tmp_path / name
    for attempt in ("new", "overwritten"):
        with StagedOutput(dest, inputs=[], overwrite=True) as staged:
            (staged.path / "model.safetensors").write_text(attempt)
            staged.commit()
        assert (dest / "model.safetensors").read_text() == attempt
    assert _leftovers(tmp_path) == []
    leftover = killed(StagedOutput(dest, inputs=[], overwrite=True))
    with StagedOutput(dest, inputs=[], overwrite=True) as staged:
        assert len(staged.notes) == 1 and str(leftover) in staged.notes[0] and not leftover.exists()


def test_commit_twice(tmp_path):
    with StagedOutput(tmp_path / "merged", inputs=[]) as staged:
        staged.commit()
        with pytest.raises(OutputError, match="already committed"):
            staged.commit()


def test_destination_created_meanwhile_is_not_replaced(tmp_path):
    dest = tmp_path / "merged"
    with StagedOutput(dest, inputs=[]) as staged:
        dest.mkdir()
        (dest / "theirs").write_text("x")
        with pytest.raises(OutputError, match="appeared while merging"):
            staged.commit()
    assert [p.name for p in dest.iterdir()] == ["theirs"] and _leftovers(tmp_path) == []


def test_an_empty_directory_is_replaced_without_overwrite(tmp_path):
    """mergekit writes into an existing directory; an empty one (made by a script, say) holds
    nothing to lose, so the output takes its place, also when it appears during the merge."""
    for made_before in (True, False):
        dest = tmp_path / f"merged-{made_before}"
        if made_before:
            dest.mkdir()
        with StagedOutput(dest, inputs=[]) as staged:
            if not made_before:
                dest.mkdir()
            (staged.path / "model.safetensors").write_text("x")
            staged.commit()
        assert (dest / "model.safetensors").read_text() == "x"
    assert _leftovers(tmp_path) == []


@pytest.fixture
def model(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"")
    return directory


@pytest.mark.parametrize("relative", ["model", "model/out", "model/a/b"])
def test_refuses_output_inside_an_input(tmp_path, model, relative):
    with pytest.raises(OutputError, match="is inside input") as err:
        StagedOutput(tmp_path / relative, inputs=[model], overwrite=True)
    assert str(model) in str(err.value)


def test_bare_file_input_protects_its_directory(tmp_path, model):
    with pytest.raises(OutputError, match="is inside input"):
        StagedOutput(model / "out", inputs=[model / "model.safetensors"])


def test_refuses_overwrite_that_would_delete_an_input(tmp_path, model):
    with pytest.raises(OutputError, match="--overwrite would delete"):
        StagedOutput(tmp_path, inputs=[model], overwrite=True)


def test_refuses_existing_destination_without_overwrite(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model.safetensors").write_text("x")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        StagedOutput(tmp_path / "merged", inputs=[])


@pytest.mark.parametrize("entries", [["notes.txt", "src/"], ["model.safetensors", "train/"], ["report.docx"], ["notes.txt"]])
def test_overwrite_replaces_only_what_an_earlier_output_holds(tmp_path, entries):
    """--overwrite on a directory that is not a model output (a project, a home directory)
    would delete it: refused, naming what it holds, and nothing is touched."""
    dest = tmp_path / "merged"
    dest.mkdir()
    for entry in entries:
        (dest / entry.rstrip("/")).mkdir() if entry.endswith("/") else (dest / entry).write_text("x")
    with pytest.raises(OutputError, match="which no model output holds; --overwrite replaces only an earlier output"):
        StagedOutput(dest, inputs=[], overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == sorted(e.rstrip("/") for e in entries)


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("earlier_output", [True, False])
def test_the_current_directory_is_never_the_output(tmp_path, monkeypatch, overwrite, earlier_output):
    """`fastmerge run cfg . --overwrite` emptied a project directory; an empty current
    directory would have been renamed over."""
    if earlier_output:
        (tmp_path / "model.safetensors").write_text("x")
    monkeypatch.chdir(tmp_path)
    for dest in (".", "..", ""):
        with pytest.raises(OutputError, match="is \\(or holds\\) the current directory"):
            StagedOutput(dest, inputs=[], overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == (["model.safetensors"] if earlier_output else [])


def test_overwrite_refuses_the_home_directory(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_text("x")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(OutputError, match="the home directory, which --overwrite would delete"):
        StagedOutput(tmp_path, inputs=[], overwrite=True)


def test_overwrite_refuses_a_directory_that_shards_link_into(tmp_path):
    """A shard may be a link into another directory (a Hugging Face cache's snapshot into its
    blobs): replacing that directory would leave the input's links dangling."""
    from fastmerge.io.checkpoint import Checkpoint
    from fastmerge.demo import make_state, write_checkpoint
    from _support import TINY

    blobs = write_checkpoint(tmp_path / "blobs", make_state(TINY, 1), TINY)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for file in blobs.iterdir():
        (snapshot / file.name).symlink_to(file)
    with Checkpoint(snapshot) as checkpoint:
        with pytest.raises(OutputError, match=f"input {blobs / 'model.safetensors'} is inside output {blobs}, "
                                              "which --overwrite would delete"):
            StagedOutput(blobs, inputs=checkpoint.sources, overwrite=True, read_files=checkpoint.files)
        StagedOutput(blobs / "out", inputs=checkpoint.sources, read_files=checkpoint.files).discard()  # beside them: fine


def test_overwrite_is_true_or_false(tmp_path):
    with pytest.raises(OutputError, match="overwrite must be True or False, got 'no'"):
        StagedOutput(tmp_path / "merged", inputs=[], overwrite="no")


def test_refuses_a_file_destination(tmp_path):
    (tmp_path / "merged").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        StagedOutput(tmp_path / "merged", inputs=[], overwrite=True)


def test_sibling_with_common_prefix_is_not_inside(tmp_path, model):
    with StagedOutput(tmp_path / "model-merged", inputs=[model]) as staged:
        staged.commit()


# -- copy_model_files --


@pytest.fixture
def source(tmp_path):
    directory = tmp_path / "src"
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"model_type": "llama", "torch_dtype": "float32", "dtype": "float32"})
    )
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ):
        (directory / name).write_text(name)
    (directory / "unrelated.txt").write_text("x")
    return directory


def test_copies_config_with_new_dtype_and_tokenizer(tmp_path, source):
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_model_files(source, out, torch.bfloat16)
    assert sorted(copied) == sorted(
        [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "special_tokens_map.json",
        ]
    )
    config = json.loads((out / "config.json").read_text())
    assert config == {"model_type": "llama", "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    assert (out / "tokenizer.json").read_text() == "tokenizer.json"
    assert not (out / "unrelated.txt").exists()


def test_without_tokenizer_and_dtype(tmp_path, source):
    out = tmp_path / "out"
    out.mkdir()
    assert copy_model_files(source, out, None, copy_tokenizer=False) == ["config.json"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_symlinked_tokenizer_is_copied_as_a_file(tmp_path, source):
    (source / "tokenizer.model").symlink_to(source / "tokenizer.json")
    out = tmp_path / "out"
    out.mkdir()
    copy_model_files(source, out, None)
    assert not (out / "tokenizer.model").is_symlink()


def test_no_source_directory(tmp_path):
    assert copy_model_files(None, tmp_path, torch.float16) == []


def test_malformed_source_config(tmp_path, source):
    (source / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json"):
        copy_model_files(source, tmp_path, torch.float16)
