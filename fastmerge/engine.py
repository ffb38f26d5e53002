"""Runs a Plan: stream every output tensor through its method into the sharded writer.

Memory stays bounded by the largest tensor: inputs are zero-copy views over memory-mapped files
whose pages are released (madvise DONTNEED) as soon as the tensor is written, the writer puts
each result in place on disk (direct IO where the filesystem allows it), and three things
overlap: a reader thread asks the kernel to read ahead the next tensors' pages, the kernel merges
the current tensor, and a writer thread writes the previous result. On a GPU the reader thread
also uploads the next tensors' inputs through pinned double buffers on a side stream, and the
writer thread downloads each result the same way (io/device_staging.py).
"""

from __future__ import annotations

import json
import queue
import resource
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from tqdm import tqdm

from . import __version__
from .config import MergeSpec, load_config
from .dtypes import kernel_input
from .errors import FastmergeError
from .io import mapping_guard
from .io.checkpoint import Checkpoint
from .io.device_staging import CudaTransport, PinnedStager, Transport
from .io.output_dir import StagedOutput, copy_model_files
from .io.writer import ShardedWriter
from .methods import get_method
from .methods.base import TensorTask
from .plan import Plan, PlannedTensor, build_plan, open_checkpoints
from .units import format_size, parse_size, shards_summary
from .values import check_seed, is_integer
from .vocab.chat_templates import write_chat_template

DEFAULT_SHARD_SIZE = "5GB"
CONFIG_FILE_NAME = "mergekit_config.yml"


@dataclass
class MergeReport:
    """What a merge did; `str(report)` is the CLI's summary."""

    output_dir: Path
    method: str
    tensors: int
    shards: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    device: str
    extra_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rate = self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        return (
            f"merged {self.tensors} tensors with {self.method} into {self.output_dir} "
            f"({shards_summary(len(self.shards), self.bytes_written)}) "
            f"in {self.seconds:.2f} s: read {format_size(self.bytes_read)} ({rate:.2f} GB/s), "
            f"peak RSS {format_size(self.peak_rss_bytes)}, device {self.device}"
        ) + "".join(f"\nnote: {note}" for note in self.notes)


@dataclass
class PrepareContext:
    """Whole-model information handed to `MergeMethod.prepare` before streaming."""

    plan: Plan
    models: list[Checkpoint]
    model_names: list[str]
    base: Checkpoint | None
    global_params: dict[str, Any]
    model_params: list[dict[str, Any]]
    device: torch.device
    seed: int
    output_dir: Path
    layer_count: int | None
    backend: str | None


def resolve_device(device: str | torch.device) -> torch.device:
    """--device as a torch.device: auto, cpu, cuda or cuda:N (a GPU torch can see)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FastmergeError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise FastmergeError(f"device {device} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastmergeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FastmergeError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0")
    return device


def prepare_plan(config: str | Path | Mapping[str, Any] | MergeSpec, allow_pickle: bool = False,
                 truncate_embeddings: bool = False, flat: str | None = None) -> Plan:
    """Parse the config, open the inputs' headers and resolve every tensor (no data is read);
    `flat`: plan mergekit-pytorch's merge by tensor name (plan.build_plan)."""
    spec = config if isinstance(config, MergeSpec) else load_config(config)
    method = get_method(spec.merge_method)
    checkpoints = open_checkpoints(spec, allow_pickle=allow_pickle)
    return build_plan(spec, method, checkpoints, truncate_embeddings, flat)


def run(
    config: str | Path | Mapping[str, Any] | MergeSpec,
    out_dir: str | Path,
    *,
    device: str | torch.device = "auto",
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    threads: int | None = None,
    allow_pickle: bool = False,
    copy_tokenizer: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
    backend: str | None = None,
    truncate_embeddings: bool = False,
    flat: str | None = None,
) -> MergeReport:
    """Merge the models a mergekit-style config describes into `out_dir`
    (`truncate_embeddings`: mergekit's --unsafe-truncate-embeddings). With `flat` ("error",
    "union" or "intersection": what to do with a tensor some model lacks) the merge is
    mergekit-pytorch's: every tensor of arbitrary checkpoints by name, no layer structure.

    The output appears at `out_dir` only when complete: it is built in a temporary directory
    beside it and renamed into place, so a failed merge leaves nothing that looks finished.
    """
    started = time.perf_counter()
    reset_peak_rss()
    check_seed(seed)
    torch_device = resolve_device(device)
    max_shard = parse_size(out_shard_size)
    with _threads(threads):
        plan = prepare_plan(config, allow_pickle=allow_pickle, truncate_embeddings=truncate_embeddings, flat=flat)
        try:
            writer, final, extra = _merge_into(plan, Path(out_dir), torch_device, seed, backend, quiet, max_shard,
                                               overwrite, copy_tokenizer)
        finally:
            for checkpoint in plan.checkpoints:
                checkpoint.close()
    return MergeReport(
        output_dir=final,
        method=plan.spec.merge_method,
        tensors=len(plan.tensors),
        shards=list(writer.shard_names),
        bytes_read=plan.input_bytes,
        bytes_written=writer.total_bytes,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        device=str(torch_device),
        extra_files=extra,
        notes=plan.notes,
    )


def _merge_into(plan: Plan, out_dir: Path, torch_device: torch.device, seed: int, backend: str | None, quiet: bool,
                max_shard: int, overwrite: bool, copy_tokenizer: bool) -> tuple[ShardedWriter, Path, list[str]]:
    """Prepare, stream and write into a staged directory; commit it only when complete."""
    inputs = [path for c in plan.checkpoints for path in c.sources]
    read_files = [path for c in plan.checkpoints for path in c.files] + [Path(p) for p in mask_paths(plan)]
    with StagedOutput(out_dir, inputs, overwrite=overwrite, read_files=read_files) as staged:
        plan.notes.extend(staged.notes)
        plan.method.prepare(_prepare_context(plan, torch_device, seed, staged.path, backend))
        writer = ShardedWriter(
            staged.path,
            [(t.name, t.dtype, t.shape) for t in plan.tensors],
            max_shard,
            metadata={"merged_by": f"fastmerge {__version__}", "merge_method": plan.spec.merge_method},
        )
        try:
            _stream(plan, writer, torch_device, seed, backend, quiet, MaskHooks.for_plan(plan))
            writer.finalize()
        finally:
            writer.close()
        extra = _write_side_files(plan, staged.path, copy_tokenizer)
        final = staged.commit()
    return writer, final, extra


def _prepare_context(plan: Plan, device: torch.device, seed: int, output_dir: Path, backend: str | None) -> PrepareContext:
    models = [plan.checkpoints[plan.checkpoint_names.index(name)] for name in plan.input_models]
    base = plan.checkpoints[plan.checkpoint_names.index(plan.base_model)] if plan.base_model else None
    first = plan.tensors[0]
    return PrepareContext(
        plan=plan,
        models=models,
        model_names=list(plan.input_models),
        base=base,
        global_params=dict(plan.spec.parameters),
        model_params=first.params,
        device=device,
        seed=seed,
        output_dir=output_dir,
        layer_count=plan.layer_count,
        backend=backend,
    )


def mask_paths(plan: Plan) -> set[str]:
    """The mask files a merge reads (`parameters: {mask: PATH}`, `output_mask`)."""
    from .methods.masks import mask_file_setting  # masks -> pruning -> engine: imported when called

    paths = {mask_file_setting(p["mask"]) for t in plan.tensors for p in t.params if p.get("mask") is not None}
    if plan.spec.output_mask is not None:
        paths.add(mask_file_setting(plan.spec.output_mask, "`output_mask`"))
    return paths


class MaskHooks:
    """Sparse masks inside a merge (`parameters: {mask: PATH}` per model, top-level
    `output_mask`): every file is read and checked against the model once, before streaming."""

    def __init__(self, plan: Plan, paths: set[str]):
        from .methods.masks import MaskCache

        self.cache = MaskCache()
        self.output_mask = plan.spec.output_mask
        shapes = {t.name: t.shape for t in plan.tensors}
        for path in sorted(paths):
            self.cache.get(path).check_model(shapes, "the merged model")

    @classmethod
    def for_plan(cls, plan: Plan) -> MaskHooks | None:
        paths = mask_paths(plan)
        return cls(plan, paths) if paths else None

    def inputs(self, task: TensorTask) -> TensorTask:
        from .methods.masks import masked_inputs

        return masked_inputs(task, [self.cache.get(p["mask"]) if p.get("mask") else None for p in task.params])

    def output(self, name: str, merged: torch.Tensor) -> torch.Tensor:
        from .methods.masks import mask_output

        return mask_output(name, merged, self.cache.get(self.output_mask)) if self.output_mask else merged


def _stream(plan: Plan, writer: ShardedWriter, device: torch.device, seed: int, backend: str | None, quiet: bool,
            masks: MaskHooks | None = None) -> None:
    progress = tqdm(total=plan.output_bytes, unit="B", unit_scale=True, desc="merging", disable=quiet, leave=False)
    feed = _feed_for(plan, device)
    try:
        with _BackgroundWriter(plan, writer, progress, feed.to_host) as background:
            for tensor, staged in _prefetched(plan, feed.stage):
                background.submit(tensor, _result_of(plan, feed, tensor, staged, seed, backend, masks))
                # Waiting for the next tensor must not keep this one's GPU inputs alive.
                del staged
    finally:
        progress.close()


def _result_of(plan: Plan, feed: _HostFeed, tensor: PlannedTensor, staged: Any, seed: int, backend: str | None,
               masks: MaskHooks | None) -> Any:
    """What the writer gets for one tensor. A function of its own so that the inputs and the
    method's intermediate result are freed before the next tensor merges."""
    inputs = feed.inputs(tensor, staged)
    if tensor.copy_only:
        # Copied tensors never leave the host: the writer takes the mmap view.
        models, base = _models_and_base(tensor, inputs)
        return base if base is not None else models[0]
    return feed.result(_merge_one(plan, tensor, inputs, seed, backend, masks), tensor.dtype)


def _feed_for(plan: Plan, device: torch.device) -> _HostFeed | _DeviceFeed:
    if device.type != "cuda":
        return _HostFeed(plan)
    # An explicit index, so the reader, merging and writer threads agree on the device.
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return _DeviceFeed(plan, CudaTransport(device), CudaTransport(device))


class _HostFeed:
    """CPU merges: the inputs are the mmap views themselves (or, for a model with a LoRA
    adapter, the adapted tensors), results go to the writer as they are."""

    def __init__(self, plan: Plan):
        self._plan = plan

    def stage(self, tensor: PlannedTensor) -> list[torch.Tensor]:
        """Runs on the reader thread, so a LoRA update is computed while the previous tensor merges."""
        return self._read(tensor)

    def inputs(self, tensor: PlannedTensor, staged: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """The tensor's inputs in `_refs` order: the models', then the base's."""
        return staged if staged is not None else self._read(tensor)

    def _read(self, tensor: PlannedTensor) -> list[torch.Tensor]:
        return [self._plan.checkpoints[ref.checkpoint].tensor(ref.name) for ref in _refs(tensor)]

    def result(self, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return merged.to(device="cpu", dtype=dtype).contiguous()

    @staticmethod
    def to_host(result: torch.Tensor) -> torch.Tensor:
        return result


class _DeviceFeed(_HostFeed):
    """GPU merges (DESIGN.md "Data flow"): the reader thread uploads each tensor's inputs
    through pinned double buffers on a side stream while the previous tensor merges on the
    compute stream, and the writer thread downloads each result the same way on a stream of
    its own. Host memory holds the pinned rings, the mmap pages being copied and one result
    on its way to disk."""

    def __init__(self, plan: Plan, upload: Transport, download: Transport):
        super().__init__(plan)
        self._uploads = PinnedStager(upload)
        self._downloads = PinnedStager(download)

    def stage(self, tensor: PlannedTensor) -> tuple[list[torch.Tensor], Any] | None:
        """Runs on the reader thread. The inputs' pages are read by the time each upload
        returns, so they are released at once rather than after the write."""
        if tensor.copy_only:
            return None
        uploaded = []
        for ref in _refs(tensor):
            checkpoint = self._plan.checkpoints[ref.checkpoint]
            uploaded.append(self._uploads.upload(checkpoint.tensor(ref.name)))
            checkpoint.release(ref.name)
        return uploaded, self._uploads.ready()

    def inputs(self, tensor: PlannedTensor, staged: tuple[list[torch.Tensor], Any] | None) -> list[torch.Tensor]:
        if staged is None:
            return super().inputs(tensor, staged)
        uploaded, ready = staged
        self._uploads.transport.consume(uploaded, ready)
        return uploaded

    def result(self, merged: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        result = merged.to(dtype=dtype).contiguous()
        return result, self._downloads.transport.produced()

    def to_host(self, result: torch.Tensor | tuple[torch.Tensor, Any]) -> torch.Tensor:
        """Runs on the writer thread: copied tensors are host views already."""
        return self._downloads.download(*result) if isinstance(result, tuple) else result


class _BackgroundWriter:
    """Writes merged tensors on a thread of its own, so the kernel merges tensor n+1 while
    tensor n goes to the output file (pwrite releases the GIL, and a write waits on the disk
    while the CPU has merging to do).

    At most one write is in flight: `submit` waits for the previous one first, so memory holds
    the inputs being merged plus two results, never more. A tensor's input pages are released
    after its write, since a copied tensor's result is a view of those very pages. A failed
    write is raised from the next `submit` or from leaving the block.
    """

    def __init__(self, plan: Plan, writer: ShardedWriter, progress: tqdm,
                 to_host: Callable[[Any], torch.Tensor] = lambda result: result):
        self._plan, self._writer, self._progress, self._to_host = plan, writer, progress, to_host
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastmerge-writer")
        self._pending: Future | None = None
        self._pages_cut_short = mapping_guard.pages_cut_short()

    def submit(self, tensor: PlannedTensor, result: Any) -> None:
        self._wait()
        self._pending = self._executor.submit(self._write, tensor, result)

    def _write(self, tensor: PlannedTensor, result: Any) -> None:
        self._writer.write(tensor.name, self._to_host(result))
        # An input cut short under the merge stops it here, not minutes later at the commit.
        mapping_guard.check_intact(self._pages_cut_short)
        for ref in _refs(tensor):
            self._plan.checkpoints[ref.checkpoint].release(ref.name)
        self._progress.update(tensor.nbytes)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> _BackgroundWriter:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        # Always let the last write finish before the writer's files can be closed; its error
        # matters only when the merge itself did not fail first.
        try:
            self._wait()
        except BaseException:
            if exc_type is None:
                raise
        finally:
            self._executor.shutdown(wait=True)


def _refs(tensor: PlannedTensor):
    return tensor.inputs + ([tensor.base] if tensor.base is not None else [])


def _models_and_base(tensor: PlannedTensor, loaded: list[Any]) -> tuple[list[Any], Any]:
    """Split what was loaded for `_refs(tensor)`, in that order, into the models' and the base's."""
    return loaded[: len(tensor.inputs)], (loaded[-1] if tensor.base is not None else None)


def _prefetched(plan: Plan, stage: Callable[[PlannedTensor], Any], depth: int = 2) -> Iterator[tuple[PlannedTensor, Any]]:
    """Yield the plan's tensors, each with what `stage` made of it, while a reader thread
    stages up to `depth` tensors ahead, so disk reads (and uploads to a GPU) overlap the merge
    of the current tensor. Before staging a tensor the reader reads the next one's bytes into
    the page cache (`SafetensorsFile.prefetch`), so the merge and the uploads find them there.
    An error on the reader thread is raised here, in the tensor's turn."""
    items: queue.Queue[tuple[PlannedTensor, Any] | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def prefetch(tensor: PlannedTensor) -> None:
        for ref in _refs(tensor):
            plan.checkpoints[ref.checkpoint].prefetch(ref.name)

    def reader() -> None:
        try:
            tensors = plan.tensors
            if tensors:
                prefetch(tensors[0])
            for tensor, upcoming in zip(tensors, [*tensors[1:], None]):
                if stop.is_set():
                    return
                if upcoming is not None:
                    prefetch(upcoming)
                items.put((tensor, stage(tensor)))
        except BaseException as exc:  # noqa: BLE001 - handed to the merging thread
            items.put(exc)
            return
        items.put(None)

    thread = threading.Thread(target=reader, name="fastmerge-prefetch", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # A merge that fails mid-way must not leave the reader blocked on a full queue (or
        # touching checkpoints the caller is about to close): stop it and drain until it exits.
        stop.set()
        while thread.is_alive():
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def _merge_one(plan: Plan, tensor: PlannedTensor, inputs: list[torch.Tensor], seed: int, backend: str | None,
               masks: MaskHooks | None = None) -> torch.Tensor:
    """Merge one planned tensor from its inputs (in `_refs` order, on the merge's device)."""
    models, base = _models_and_base(tensor, inputs)
    task = TensorTask(
        name=tensor.name,
        inputs=[kernel_input(t) for t in models],
        base=kernel_input(base) if base is not None else None,
        params=tensor.params,
        global_params=tensor.global_params,
        out_dtype=tensor.dtype,
        layer=tensor.layer,
        seed=seed,
        backend=backend,
        model_names=list(plan.input_models),
    )
    if tensor.vocab is not None:
        task = tensor.vocab.align(task)
    if masks is not None:
        task = masks.inputs(task)
    result = plan.method.merge_tensor(task)
    if masks is not None:
        result = masks.output(tensor.name, result)
    if result.shape != torch.Size(tensor.shape):
        raise FastmergeError(f"{plan.spec.merge_method} produced shape {list(result.shape)} for {tensor.name}, expected {list(tensor.shape)}")
    return result


# config.json keys the plan may change: slices change the depth, a tokenizer_source the
# vocabulary, and a merged lm_head from an untied input unties the output.
_PLANNED_CONFIG_KEYS = ("num_hidden_layers", "vocab_size", "tie_word_embeddings")


def _write_side_files(plan: Plan, directory: Path, copy_tokenizer: bool) -> list[str]:
    """config.json (dtype, layer count, vocab size and tying updated), the tokenizer (the one
    built for `tokenizer_source`, else the donor's files copied), its chat template, and the
    merge config."""
    source = plan.config_source
    out_dtype = next((t.dtype for t in plan.tensors if not t.copy_only), None)
    copy_donor_tokenizer = copy_tokenizer and plan.vocabulary is None
    written = copy_model_files(source.directory if source else None, directory, out_dtype, copy_tokenizer=copy_donor_tokenizer)
    config_path = directory / "config.json"
    if plan.output_config is not None and config_path.exists():
        config = json.loads(config_path.read_text())
        changed = {k: plan.output_config[k] for k in _PLANNED_CONFIG_KEYS if k in plan.output_config and config.get(k) != plan.output_config[k]}
        if changed:
            config.update(changed)
            config_path.write_text(json.dumps(config, indent=2) + "\n")
    if plan.vocabulary is not None:
        written += plan.vocabulary.save(directory)
    if plan.chat_template is not None and (copy_tokenizer or plan.vocabulary is not None):
        write_chat_template(directory, plan.chat_template)
        written += [] if "tokenizer_config.json" in written else ["tokenizer_config.json"]
    (directory / CONFIG_FILE_NAME).write_text(plan.spec.to_yaml(), encoding="utf-8")
    return written + [CONFIG_FILE_NAME]


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """With `threads` threads for torch and the kernels, then as many as before: a library call
    must not leave its caller's process on one thread."""
    if threads is None:
        yield
        return
    from . import _native

    before = torch.get_num_threads(), getattr(_native, "max_threads", lambda: None)()
    set_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        if before[1] is not None:
            _native.set_num_threads(before[1])


def set_threads(threads: int) -> None:
    if not is_integer(threads) or threads < 1:
        raise FastmergeError(f"--threads must be an integer >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    from . import _native

    if hasattr(_native, "set_num_threads"):
        _native.set_num_threads(threads)


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark so the report shows this merge's peak, not the
    process's (Linux: writing 5 to clear_refs; elsewhere the process peak is reported)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

