"""An input file cut short while it is mapped: an error naming it, not SIGBUS.

Each case runs in a child process: without the guard, touching the lost pages kills the process
that touches them."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from _support import write_config
from fastmerge.demo import LlamaShape, fine_tune_of, make_state, write_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard is Linux's")

_READ_AFTER_CUT = """
import os, sys
import torch
from fastmerge.errors import CheckpointError
from fastmerge.io import mapping_guard
from fastmerge.io.safetensors_file import SafetensorsFile

path = sys.argv[1]
before = mapping_guard.pages_cut_short()
shard = SafetensorsFile(path)
view = shard.tensor("big")
os.truncate(path, shard.info("big").begin)  # every page of the tensor after its first is gone
total = view.double().sum().item()  # the lost pages read as zeros
assert mapping_guard.pages_cut_short() > before
try:
    mapping_guard.check_intact(before)
except CheckpointError as exc:
    print(exc)
    print("sum", total)
"""


def test_a_mapped_file_cut_short_reads_as_an_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"big": torch.ones(64, 1024)}, path)
    size = path.stat().st_size
    done = subprocess.run([sys.executable, "-c", _READ_AFTER_CUT, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    message, total = done.stdout.splitlines()
    assert message.startswith(f"{path} (was {size} bytes, now {path.stat().st_size} bytes): cut short while it was "
                              "being read")
    assert float(total.split()[1]) < 64 * 1024  # at most the first page still held ones


_UNGUARDED_READ = """
import mmap, os, sys
import numpy as np
from fastmerge.io.safetensors_file import SafetensorsFile

guarded = SafetensorsFile(sys.argv[1])
guarded.tensor("big")  # installs the handler
with open(sys.argv[2], "rb") as f:
    other = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
os.truncate(sys.argv[2], 0)
print(np.frombuffer(other, dtype=np.uint8)[8192:].sum())
"""


def test_other_mappings_still_fault(tmp_path):
    """The handler acts only on the mappings fastmerge guards: anyone else's lost page ends the
    process as before (the previous disposition), never reads as zeros."""
    save_file({"big": torch.ones(64, 1024)}, tmp_path / "model.safetensors")
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x01" * 65536)
    done = subprocess.run([sys.executable, "-c", _UNGUARDED_READ, str(tmp_path / "model.safetensors"), str(other)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stdout, done.stderr)


# The merge cuts the first fine-tune's shard short at its last tensor right after the reader has
# mapped that tensor (and read its pages into the page cache): the merge then touches pages that
# are gone, as when a copy or a download overwrites the file mid-merge.
_CUT_DURING_MERGE = """
import os, sys
from fastmerge.cli import main
from fastmerge.io.safetensors_file import SafetensorsFile

victim = sys.argv[1]
tensor = SafetensorsFile.tensor

def tensor_then_cut(self, name):
    view = tensor(self, name)
    info = self.info(name)
    if str(self.path) == victim and info.end == max(i.end for i in self.infos.values()):
        os.truncate(self.path, info.begin)
    return view

SafetensorsFile.tensor = tensor_then_cut
sys.exit(main(["run", sys.argv[2], sys.argv[3], "--quiet"]))
"""


def test_a_merge_whose_input_is_cut_short_stops_naming_it(tmp_path):
    shape = LlamaShape(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128)
    base = make_state(shape, seed=0)
    models = {"base": write_checkpoint(tmp_path / "base", base, shape)}
    for i in (1, 2):
        models[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", fine_tune_of(base, seed=i), shape)
    victim = next(models["ft1"].glob("*.safetensors"))
    config = write_config(tmp_path / "m.yml", {
        "merge_method": "task_arithmetic", "base_model": str(models["base"]),
        "models": [{"model": str(models[n]), "parameters": {"weight": 0.5}} for n in ("ft1", "ft2")]})
    out = tmp_path / "out" / "merged"
    done = subprocess.run([sys.executable, "-c", _CUT_DURING_MERGE, str(victim), str(config), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"fastmerge: error: {victim} (was ") and "cut short while it was being read" in done.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
