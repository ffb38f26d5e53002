"""Never leave a half-written output that looks complete.

A merge writes into a hidden temporary directory beside the destination (same filesystem, so
the final move is an atomic rename) and only renames it into place once everything is on disk.
A crash leaves `.<name>.fastmerge-tmp-<random>`, which no tool mistakes for a model; the next run
to the same output removes it (each run holds a lock on its own, which its death releases).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dtypes import config_name
from ..errors import CheckpointError, OutputError
from ..units import format_size, shards_summary
from . import mapping_guard

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"


def _is_within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _is_occupied(path: Path) -> bool:
    """Whether something is at `path` that the output may not simply take the place of: anything
    but an empty directory (a rename replaces one of those)."""
    if not (path.exists() or path.is_symlink()):
        return False
    return path.is_symlink() or not path.is_dir() or any(path.iterdir())


# What an earlier output holds: weights and masks, configs, tokenizer files, mergekit_config.yml,
# reports and charts (sparsity.png, recall_weights.png), a model card. --overwrite replaces only
# such a directory.
_OUTPUT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".yml", ".yaml", ".model", ".txt", ".jinja", ".tiktoken",
                    ".md", ".png")


def _not_a_model_output(path: Path) -> list[str]:
    """The entries of directory `path` that no model output holds (subdirectories, other files),
    or all of them when none of them is weights."""
    entries = list(path.iterdir())
    foreign = [e.name for e in entries if e.is_dir() or not e.name.endswith(_OUTPUT_SUFFIXES)]
    if foreign or any(e.name.endswith((".safetensors", ".bin", ".pt")) for e in entries):
        return foreign
    return [e.name for e in entries]


def _hidden_prefix(destination: Path, kind: str) -> str:
    """`.<name>.fastmerge-<kind>-`, the start of a hidden directory's name beside `destination`
    (mkdtemp adds 8 characters). The name is cut to 200 bytes, so that an output name as long as
    the filesystem allows (255 bytes) still leaves room for the rest."""
    return f".{os.fsdecode(os.fsencode(destination.name)[:200])}.fastmerge-{kind}-"


def _hold(directory: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `directory` for as long as this process
    lives (the kernel drops it when the process dies, however it dies); None where another
    process holds it, the filesystem has no locks or the directory cannot be opened (another
    user's)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_abandoned(destination: Path) -> list[str]:
    """Remove the staging directories that runs killed outright (SIGKILL, the OOM killer) left
    beside `destination`, each maybe gigabytes that nothing else removes, and say so. A staging
    directory whose lock a live run holds (another fastmerge writing the same output) stays."""
    removed, size = [], 0
    for directory in sorted(destination.parent.glob(f"{glob.escape(_hidden_prefix(destination, 'tmp'))}*")):
        fd = _hold(directory) if directory.is_dir() and not directory.is_symlink() else None
        if fd is None:
            continue
        try:
            size += sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
        finally:
            os.close(fd)
    if not removed:
        return []
    return [f"removed {len(removed)} staging director{'y' if len(removed) == 1 else 'ies'} that earlier runs, "
            f"killed before they finished, left beside the output ({format_size(size)}): {removed[0]}"
            f"{', ...' if len(removed) > 1 else ''}"]


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories atomically (Linux's renameat2 with RENAME_EXCHANGE). False where the
    system or the filesystem cannot, and the caller falls back to two renames."""
    rename = getattr(_libc(), "renameat2", None)
    if rename is None:
        return False
    at_cwd, rename_exchange = -100, 2
    if rename(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(first), None, str(second))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library of this process, for calls the os module lacks; None off Linux."""
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class StagedOutput:
    """A temporary output directory that becomes `destination` only on commit()."""

    def __init__(self, destination: str | Path, inputs: Sequence[Path], overwrite: bool = False,
                 read_files: Sequence[Path] = ()):
        """`inputs`: the model directories (or files) the command reads, which the output may not
        lie inside; `read_files`: other files it reads (masks, the real files behind linked
        shards), which --overwrite may not delete."""
        if not isinstance(overwrite, bool):  # "yes" or "no" would both replace the output
            raise OutputError(f"overwrite must be True or False, got {overwrite!r}")
        self.destination = Path(destination).expanduser().resolve()
        self.overwrite = overwrite
        self._check_destination(inputs, read_files)
        self.notes = _remove_abandoned(self.destination)
        # The directories made for the output, deepest first: a failed run removes them again.
        self._made = [d for d in [self.destination.parent, *self.destination.parent.parents] if not d.exists()]
        try:
            self.destination.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(
                tempfile.mkdtemp(
                    prefix=_hidden_prefix(self.destination, "tmp"), dir=self.destination.parent
                )
            )
            # mkdtemp makes the directory private (0700); the finished model should get the
            # permissions any directory the user creates gets.
            umask = os.umask(0)
            os.umask(umask)
            self.path.chmod(0o777 & ~umask)
            self._lock = _hold(self.path)  # until commit or discard: no later run takes it for a killed run's
        except OSError as exc:
            raise OutputError(f"{self.destination}: cannot create the output ({exc})") from None
        self._committed = False
        self._pages_cut_short = mapping_guard.pages_cut_short()

    def _check_destination(self, inputs: Sequence[Path], read_files: Sequence[Path]) -> None:
        dest = self.destination
        if dest.is_file():
            raise OutputError(f"output {dest} is a file; give a directory path")
        if _is_within(Path.cwd().resolve(), dest):  # the output replaces its directory, by a rename
            raise OutputError(f"output {dest} is (or holds) the current directory; give the path of a directory to make")
        for given, is_model in [*((path, True) for path in inputs), *((path, False) for path in read_files)]:
            resolved = Path(given).expanduser().resolve()
            input_dir = resolved if resolved.is_dir() else resolved.parent
            if is_model and _is_within(dest, input_dir):  # beside a mask or a linked shard is fine
                raise OutputError(
                    f"output {dest} is inside input {input_dir}; inputs are never written, "
                    "choose an output outside it"
                )
            if self.overwrite and _is_within(input_dir, dest):
                raise OutputError(
                    f"input {resolved} is inside output {dest}, which --overwrite would delete"
                )
        if _is_occupied(dest):  # an empty directory is simply replaced
            if not self.overwrite:
                raise OutputError(f"output {dest} already exists; pass --overwrite or choose another path")
            if _is_within(Path.home().resolve(), dest):
                raise OutputError(f"output {dest} is (or holds) the home directory, which --overwrite would delete; "
                                  "choose another path")
            foreign = sorted(_not_a_model_output(dest))
            if foreign:
                raise OutputError(f"output {dest} holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, "
                                  "which no model output holds; --overwrite replaces only an earlier output "
                                  "(weights, configs, tokenizer files): remove it yourself or choose another path")

    def commit(self) -> Path:
        """Move the finished output into place; with overwrite, the old one goes only afterwards."""
        if self._committed:
            raise OutputError(f"{self.destination}: output already committed")
        mapping_guard.check_intact(self._pages_cut_short)
        dest = self.destination
        old: Path | None = None
        try:
            if _is_occupied(dest):  # the rename replaces an empty directory
                if not self.overwrite:
                    raise OutputError(f"output {dest} appeared while merging; not replacing it")
                old = self._replace(dest)
            else:
                os.rename(self.path, dest)
        except OSError as exc:
            raise OutputError(
                f"{dest}: cannot move the finished output into place ({exc})"
            ) from None
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return dest

    def _replace(self, dest: Path) -> Path:
        """Put the output where an earlier one is; returns the directory now holding the earlier
        one. The two swap places in one step where the system can, so that `dest` never lacks a
        complete output, even if the process dies in between."""
        if _exchange(self.path, dest):
            return self.path
        old = Path(tempfile.mkdtemp(prefix=_hidden_prefix(dest, "old"), dir=dest.parent))
        moved = False
        try:
            os.rename(dest, old / dest.name)
            moved = True
            os.rename(self.path, dest)
        except OSError:
            if moved:
                os.rename(old / dest.name, dest)
            old.rmdir()
            raise
        return old

    def discard(self) -> None:
        """Delete the temporary directory (after a failure, or when commit was never reached) and
        let go of its lock."""
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
            for directory in self._made:
                try:
                    directory.rmdir()  # only while empty: another run may have put something there
                except OSError:
                    break
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        if self._committed and isinstance(exc, KeyboardInterrupt):
            exc.committed_output = self.destination  # stopped after the commit: the CLI says it is in place
        self.discard()


def _write_config(source: Path, destination: Path, torch_dtype: torch.dtype | None) -> None:
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: cannot read the model config ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: the model config must be a JSON object")
    write_model_config(config, destination, torch_dtype)


def write_model_config(config: dict, destination: Path, torch_dtype: torch.dtype | None) -> None:
    """Write a config.json that names `torch_dtype` (None: as the config says)."""
    config = dict(config)
    if torch_dtype is not None:
        config["torch_dtype"] = config_name(torch_dtype)
        if "dtype" in config:  # newer transformers write `dtype` instead
            config["dtype"] = config_name(torch_dtype)
    destination.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def copy_model_files(
    source_dir: Path | None,
    destination: Path,
    torch_dtype: torch.dtype | None,
    copy_tokenizer: bool = True,
) -> list[str]:
    """Copy config.json (with the output dtype), tokenizer files and generation_config.json.

    Returns the names copied. Symlinks (HF cache) are followed, so the output holds real files.
    """
    if source_dir is None:
        return []
    source_dir, destination = Path(source_dir), Path(destination)
    copied = []
    if (source_dir / "config.json").is_file():
        _write_config(source_dir / "config.json", destination / "config.json", torch_dtype)
        copied.append("config.json")
    extras = (*TOKENIZER_FILES, GENERATION_CONFIG) if copy_tokenizer else ()
    for name in extras:
        if (source_dir / name).is_file():
            try:
                shutil.copyfile(source_dir / name, destination / name)
            except OSError as exc:
                raise OutputError(
                    f"copying {source_dir / name} to {destination} failed ({exc})"
                ) from None
            copied.append(name)
    return copied


@dataclass(kw_only=True)
class OutputReport:
    """What a command that writes a model directory reports: where, how much, how long, its peak
    memory and notes. Subclasses add what they did and say it in `__str__` through `summary`."""

    output_dir: Path
    shards: list[str]
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    notes: list[str] = field(default_factory=list)

    def summary(self, did: str, details: Sequence[str] = ()) -> str:
        """`did` (what the command made), where it went, its size, time and peak memory; then the
        `details` lines and a line per note."""
        headline = (f"{did} into {self.output_dir} ({shards_summary(len(self.shards), self.bytes_written)}) in "
                    f"{self.seconds:.2f} s, peak RSS {format_size(self.peak_rss_bytes)}")
        return "\n".join([headline, *details, *(f"note: {note}" for note in self.notes)])
