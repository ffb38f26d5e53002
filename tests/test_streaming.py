"""The engine's overlapped streaming: writes on a background thread, errors never lost, output
identical to a merge without overlap."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

import fastmerge
from _support import load_dir
from fastmerge.engine import _BackgroundWriter, _prefetched
from fastmerge.errors import OutputError


class RecordingWriter:
    """Stands in for ShardedWriter: records writes and the thread they ran on; can fail or stall."""

    def __init__(self, fail_on: str | None = None, gate: threading.Event | None = None):
        self.calls: list[tuple[str, str]] = []
        self.fail_on, self.gate = fail_on, gate

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.gate is not None:
            self.gate.wait(5)
        if name == self.fail_on:
            raise OutputError(f"disk full writing {name!r}")
        self.calls.append((name, threading.current_thread().name))


class RecordingCheckpoint:
    def __init__(self):
        self.released: list[str] = []

    def release(self, name: str) -> None:
        self.released.append(name)


def _plan_and_tensors(names):
    checkpoint = RecordingCheckpoint()
    plan = SimpleNamespace(checkpoints=[checkpoint])
    tensors = [SimpleNamespace(name=n, nbytes=4, inputs=[SimpleNamespace(checkpoint=0, name=n)], base=None) for n in names]
    return plan, checkpoint, tensors


def _progress():
    return SimpleNamespace(total=0, update=lambda n: None)


def test_writes_run_in_order_on_the_writer_thread_and_release_inputs_after():
    plan, checkpoint, tensors = _plan_and_tensors(["a", "b", "c"])
    writer = RecordingWriter()
    with _BackgroundWriter(plan, writer, _progress()) as background:
        for t in tensors:
            background.submit(t, torch.zeros(1))
    assert [name for name, _ in writer.calls] == ["a", "b", "c"]
    assert all(thread.startswith("fastmerge-writer") for _, thread in writer.calls)
    assert checkpoint.released == ["a", "b", "c"]


def test_a_failed_write_is_raised_by_the_next_submit():
    plan, _, tensors = _plan_and_tensors(["a", "b", "c"])
    with pytest.raises(OutputError, match="disk full writing 'a'"):
        with _BackgroundWriter(plan, RecordingWriter(fail_on="a"), _progress()) as background:
            for t in tensors:
                background.submit(t, torch.zeros(1))


def test_a_failed_last_write_is_raised_when_leaving():
    plan, _, tensors = _plan_and_tensors(["a"])
    with pytest.raises(OutputError, match="'a'"):
        with _BackgroundWriter(plan, RecordingWriter(fail_on="a"), _progress()) as background:
            background.submit(tensors[0], torch.zeros(1))


def test_a_merge_error_waits_for_the_pending_write_and_wins():
    plan, _, tensors = _plan_and_tensors(["a"])
    gate = threading.Event()
    writer = RecordingWriter(gate=gate)
    with pytest.raises(ValueError, match="kernel failed"):
        with _BackgroundWriter(plan, writer, _progress()) as background:
            background.submit(tensors[0], torch.zeros(1))
            threading.Timer(0.2, gate.set).start()
            raise ValueError("kernel failed")
    # The block was left only after the write finished, so the files were never closed under it.
    assert writer.calls and writer.calls[0][0] == "a"


def test_overlapped_merge_output_does_not_depend_on_threads_or_sharding(tiny_models, tmp_path):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models[n]), "parameters": {"weight": w}} for n, w in (("ft1", 0.5), ("ft2", 0.3))],
        "dtype": "bfloat16",
    }
    first = fastmerge.run(config, tmp_path / "a", out_shard_size="30K", quiet=True, threads=1)
    again = fastmerge.run(config, tmp_path / "b", out_shard_size="5GB", quiet=True, threads=2)
    a, b = load_dir(first.output_dir), load_dir(again.output_dir)
    assert len(first.shards) > 1 and set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_the_reader_prefetches_the_next_tensor_before_staging_one():
    plan, _, tensors = _plan_and_tensors(["a", "b", "c"])
    events = []
    plan.checkpoints = [SimpleNamespace(prefetch=lambda name: events.append(("prefetch", name)))]
    plan.tensors = tensors

    def stage(tensor):
        events.append(("stage", tensor.name))
        return tensor.name.upper()

    assert [(t.name, staged) for t, staged in _prefetched(plan, stage)] == [("a", "A"), ("b", "B"), ("c", "C")]
    assert events == [("prefetch", "a"), ("prefetch", "b"), ("stage", "a"), ("prefetch", "c"), ("stage", "b"), ("stage", "c")]


def test_an_error_on_the_reader_thread_is_raised_in_its_tensors_turn():
    plan, _, tensors = _plan_and_tensors(["a", "b", "c"])
    plan.checkpoints = [SimpleNamespace(prefetch=lambda name: None)]
    plan.tensors = tensors

    def stage(tensor):
        if tensor.name == "b":
            raise MemoryError("out of pinned memory")
        return tensor.name

    seen = []
    with pytest.raises(MemoryError, match="pinned"):
        for tensor, _ in _prefetched(plan, stage):
            seen.append(tensor.name)
    assert seen == ["a"]
