"""Model references that name a Hugging Face Hub repository, as most mergekit configs do:
`mistralai/Mistral-7B-v0.1`, or `org/name@revision` for a branch, tag or commit.

A reference that is no local path but has a repository id's form is resolved by huggingface_hub
(the `hub` extra): from its cache first, without network (what earlier runs of mergekit,
transformers or `hf download` left there; HF_HUB_CACHE / HF_HOME say where), else downloaded
into that cache unless HF_HUB_OFFLINE is set; only the files a merge reads (safetensors weights,
JSON configs, tokenizer files). A local path always wins, as in mergekit. The snapshot's files
link into the cache's blobs, which --overwrite then protects (Checkpoint.files).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError

# `org/name` or `name/name@revision`: the Hub's characters for owners and repositories.
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# What a merge reads from a repository: weights, configs, tokenizers (no .bin: safetensors only).
DOWNLOADED = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def looks_like_repo_id(reference: str) -> bool:
    return _REPO_ID.match(reference) is not None


def resolve_repo(reference: str, missing: str) -> Path:
    """The local snapshot directory of Hub repository `reference` (see the module docstring);
    a CheckpointError saying why there is none, after `missing` (why it is no local path)."""
    match = _REPO_ID.match(reference)
    if match is None:
        raise CheckpointError(f"{reference}: {missing}")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{reference}: {missing}; as a Hugging Face Hub id it needs huggingface_hub "
            "(pip install 'fastmerge[hub]'), or download it first and give its path") from None
    repo, revision = match["repo"], match["revision"]
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=DOWNLOADED, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # a malformed id or cache: the library's own words
        raise CheckpointError(f"{reference}: {missing}, and the Hugging Face cache cannot give it ({exc})") from None
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{reference}: {missing}, nor a repository in the Hugging Face cache "
                              f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE forbids downloading it")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=DOWNLOADED))
    except Exception as exc:  # not found, gated, no network: huggingface_hub says which
        raise CheckpointError(f"{reference}: {missing}, and downloading it from the Hugging Face Hub failed "
                              f"({type(exc).__name__}: {exc})") from None
