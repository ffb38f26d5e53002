"""Model references that name a Hugging Face Hub repository (fastmerge/io/hub.py), resolved from
a cache laid out as huggingface_hub lays it out: refs/<branch> holds a commit, snapshots/<commit>
links each file to blobs/<hash>. The tests run offline (tests/conftest.py), so a repository the
cache lacks must be refused with the reason, and nothing is downloaded."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from _support import TINY, load_dir
from fastmerge.demo import make_state, write_checkpoint
from fastmerge.errors import CheckpointError
from fastmerge.io.checkpoint import Checkpoint
from fastmerge.io.hub import looks_like_repo_id

hub_constants = pytest.importorskip("huggingface_hub.constants")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A cache holding repository `tests/tiny` at COMMIT (branch main), and the local model it holds."""
    local = write_checkpoint(tmp_path / "local", make_state(TINY, 3), TINY)
    cache = tmp_path / "hub"
    repo = cache / "models--tests--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in local.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return local, snapshot


def test_a_repository_id_is_a_model_path_only_where_no_local_path_is(tmp_path, monkeypatch):
    assert looks_like_repo_id("mistralai/Mistral-7B-v0.1") and looks_like_repo_id("org/name@v1.0")
    assert not looks_like_repo_id("/abs/path") and not looks_like_repo_id("name") and not looks_like_repo_id("a/b/c")


@pytest.mark.parametrize("reference", ["tests/tiny", "tests/tiny@main", f"tests/tiny@{COMMIT}"])
def test_a_cached_repository_merges_like_its_local_copy(hub_cache, tmp_path, reference):
    import fastmerge

    local, snapshot = hub_cache
    with Checkpoint(reference) as checkpoint:
        assert checkpoint.path == snapshot.resolve()
        assert all(f.parent.name == "blobs" for f in checkpoint.files)  # what --overwrite must not delete
    merged = []
    for i, model in enumerate((reference, str(local))):
        config = {"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}}], "dtype": "float32"}
        merged.append(load_dir(fastmerge.run(config, tmp_path / f"out{i}", quiet=True).output_dir))
    assert merged[0].keys() == merged[1].keys() and all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])


def test_offline_a_repository_the_cache_lacks_is_refused_with_the_reason(hub_cache):
    with pytest.raises(CheckpointError, match="tests/other: no such model directory or file .*, nor a repository in "
                                              "the Hugging Face cache .*HF_HUB_OFFLINE forbids downloading it"):
        Checkpoint("tests/other")
    with pytest.raises(CheckpointError, match="tests/tiny@v9: .*HF_HUB_OFFLINE"):
        Checkpoint("tests/tiny@v9")  # a revision the cache has no ref for


def test_without_huggingface_hub_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r"org/name: no such model directory or file \(looked for .*\); as a "
                                              r"Hugging Face Hub id it needs huggingface_hub \(pip install 'fastmerge\[hub\]'\)"):
        Checkpoint("org/name")
