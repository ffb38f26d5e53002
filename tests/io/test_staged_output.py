"""StagedOutput (atomic output directories) and copy_model_files."""

from __future__ import annotations

import json

import pytest
import torch

from fastmerge.errors import CheckpointError, OutputError
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


def test_leaving_without_commit_deletes_the_temporary_directory(tmp_path):
    with StagedOutput(tmp_path / "merged", inputs=[]):
        pass
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_old_output_only_after_success(tmp_path):
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "old").write_text("old")
    with StagedOutput(dest, inputs=[], overwrite=True) as staged:
        assert (dest / "old").exists()  # untouched while merging
        (staged.path / "new").write_text("new")
        staged.commit()
    assert [p.name for p in dest.iterdir()] == ["new"]
    assert _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with StagedOutput(dest, inputs=[], overwrite=True):
            raise RuntimeError("merge failed")
    assert (dest / "old").read_text() == "old"


def test_commit_twice(tmp_path):
    with StagedOutput(tmp_path / "merged", inputs=[]) as staged:
        staged.commit()
        with pytest.raises(OutputError, match="already committed"):
            staged.commit()


def test_destination_created_meanwhile_is_not_replaced(tmp_path):
    dest = tmp_path / "merged"
    with StagedOutput(dest, inputs=[]) as staged:
        dest.mkdir()
        with pytest.raises(OutputError, match="appeared while merging"):
            staged.commit()
    assert list(dest.iterdir()) == [] and _leftovers(tmp_path) == []


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
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        StagedOutput(tmp_path / "merged", inputs=[])


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
