"""`fastmerge prune`: statistics -> scores -> masks -> pruned checkpoint, in one staged output.

The output directory holds the pruned model (same tensor names, shapes and dtypes; targeted
weights zeroed by `apply_mask`), its config and tokenizer files, `masks.safetensors`
(fastmerge.pruning.mask_file), `sparsity.json` and `sparsity.png`. Like a merge it is built in a
temporary directory beside the destination and renamed into place only when complete; the
gradient statistics live inside that temporary directory and are deleted before the rename.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..engine import peak_rss_bytes, resolve_device
from ..errors import CheckpointError, PlanError
from ..io.checkpoint import Checkpoint
from ..io.lora import open_model
from ..io.output_dir import StagedOutput, copy_model_files
from ..io.writer import ShardedWriter
from ..ops import apply_mask
from ..units import parse_size
from .config import PruneConfig, load_prune_config
from .mask_file import FILE_NAME, MaskSet, architecture_fingerprint
from .report import sparsity_summary, write_report
from .scores import Scorer
from .selection import select_masks
from .statistics import FISHER_SUFFIX, collect_statistics
from .targets import select_targets

STATISTICS_DIR = ".statistics"


@dataclass
class PruneReport:
    output_dir: Path
    score: str
    targeted: int
    kept: int
    seconds: float
    peak_rss_bytes: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.targeted

    def __str__(self) -> str:
        return (
            f"pruned {self.targeted - self.kept} of {self.targeted} targeted weights "
            f"({self.sparsity:.2%}) by {self.score} into {self.output_dir} in {self.seconds:.1f} s"
        )


def _fisher_mean(statistics: Checkpoint, targets: list[str]) -> float:
    total = count = 0.0
    for name in targets:
        fisher = statistics.tensor(name + FISHER_SUFFIX)
        total += float(fisher.double().sum())
        count += fisher.numel()
    return total / count


def compute_masks(cfg: PruneConfig, checkpoint: Checkpoint, work_dir: Path, device: torch.device,
                  backend: str | None = None) -> MaskSet:
    """The keep-masks `cfg` asks for over `checkpoint`; statistics (if any) go under work_dir."""
    shapes = {name: tuple(checkpoint.info(name).shape) for name in checkpoint.names}
    statistics: dict[str, Checkpoint] = {}
    if cfg.needs_data:
        targets, statistics = collect_statistics(cfg, checkpoint, work_dir, device)
    else:
        targets = select_targets(shapes, cfg.targets, cfg.reference)
    scorer = Scorer(
        cfg,
        {set_name: stats.tensor for set_name, stats in statistics.items()},
        {set_name: _fisher_mean(stats, targets) for set_name, stats in statistics.items()},
    )
    try:
        dense = dict(select_masks(targets, lambda n: finite_scores(cfg, checkpoint, scorer, n), cfg.sparsity,
                                  cfg.budget, cfg.structure, backend))
    finally:
        for stats in statistics.values():
            stats.close()
    info = {"model": cfg.reference, "score": cfg.score, "sparsity": repr(cfg.sparsity), "structure": cfg.structure,
            "budget": cfg.budget}
    return MaskSet.from_dense(dense, architecture_fingerprint(shapes.items()), info)


def finite_scores(cfg: PruneConfig, checkpoint: Checkpoint, scorer: Scorer, name: str) -> torch.Tensor:
    """Tensor `name`'s scores, refused with the culprit named when any is NaN or inf.

    Selection could only report "scores tensor #i", and a NaN weight anywhere in the model makes
    every gradient (so every data-aware score) NaN, so the first bad score rarely points at the
    bad weight: on failure the model's tensors are searched for it (a pass paid only then).
    """
    theta = checkpoint.tensor(name)
    scores = scorer(name, theta)
    if bool(torch.isfinite(scores).all()):
        return scores
    candidates = [name] + [n for n in checkpoint.names if n != name] if cfg.needs_data else [name]
    for candidate in candidates:
        tensor = theta if candidate == name else checkpoint.tensor(candidate)
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"tensor {candidate} of model {cfg.reference} ({checkpoint.info(candidate).path}) holds NaN or inf; "
                "pruning scores need finite weights"
            )
    raise PlanError(
        f"the {cfg.score} scores of tensor {name} of model {cfg.reference} are not finite although its weights are: "
        f"the gradient statistics hold NaN or inf (did the {cfg.dtype} loss overflow? try dtype: float32)"
    )


def write_pruned(checkpoint: Checkpoint, masks: MaskSet, directory: Path, max_shard_bytes: int) -> None:
    """Every tensor of `checkpoint` into `directory`, the masked ones through `apply_mask`."""
    specs = [(n, checkpoint.info(n).dtype, tuple(checkpoint.info(n).shape)) for n in checkpoint.names]
    with ShardedWriter(directory, specs, max_shard_bytes, metadata={"pruned_by": "fastmerge"}) as writer:
        for name in checkpoint.names:
            tensor = checkpoint.tensor(name)
            if name in masks.packed:
                masks.check_tensor(name, tensor.shape)
                tensor = apply_mask(tensor, masks.packed[name], 1.0)
            writer.write(name, tensor)
            checkpoint.release(name)
        writer.finalize()


def prune(config: str | Path | Mapping[str, Any] | PruneConfig, out_dir: str | Path, *, device: str = "auto",
          out_shard_size: str | int = "5GB", overwrite: bool = False, backend: str | None = None) -> PruneReport:
    """Prune the model a prune config describes into `out_dir` (see the module docstring)."""
    started = time.perf_counter()
    cfg = config if isinstance(config, PruneConfig) else load_prune_config(config)
    torch_device = resolve_device(device)
    with open_model(cfg.reference) as checkpoint, \
            StagedOutput(out_dir, checkpoint.sources, overwrite=overwrite, read_files=checkpoint.files) as staged:
        work_dir = staged.path / STATISTICS_DIR
        masks = compute_masks(cfg, checkpoint, work_dir, torch_device, backend)
        shutil.rmtree(work_dir, ignore_errors=True)
        write_pruned(checkpoint, masks, staged.path, parse_size(out_shard_size))
        masks.save(staged.path / FILE_NAME)
        summary = sparsity_summary(masks)
        write_report(summary, staged.path)
        copy_model_files(checkpoint.directory, staged.path, None)
        final = staged.commit()
    return PruneReport(final, cfg.score, summary["overall"]["numel"], summary["overall"]["kept"],
                       time.perf_counter() - started, peak_rss_bytes())
