"""LoRA extraction (mergekit-extract-lora's job): a PEFT adapter whose updates approximate a
fine-tune's task vector, so `base+adapter` stands in for the fine-tune at a fraction of its size.

For every matrix (`X.weight`, 2-d) of the fine-tune, D = fine-tune - base (fp32) is factored by
its singular value decomposition D = U S V^T and the top r = min(max_rank, rank) directions kept:
B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T (`distribute_scale`, the default), or B = U_r, A = S_r V_r^T,
so B @ A is the best rank-r approximation of D (Eckart-Young). Singular values at or below
`sv_epsilon` (default 0) are dropped too, so a module the fine-tune left unchanged gets no update
(mergekit saves zeros for it). The input embedding is factored transposed (peft's
lora_embedding_A is r x vocab). A linear layer's bias delta is saved as its `lora_B.bias`.
As in mergekit:
- embeddings (input and output) are saved whole in `modules_to_save` unless `embed_lora`;
- other tensors (norms, and anything that is not a matrix) are saved whole unless
  `skip_undecomposable`; modules named in `modules_to_save` are saved whole too;
- `include` / `exclude` regexes (searched in the module name) choose the modules;
- A and B take the fine-tune's dtype; the config sets lora_alpha = r for every module
  (`rank_pattern` and `alpha_pattern` for modules of lower rank), so each update is B @ A.

`svd: exact` is LAPACK's full SVD (what mergekit computes). `svd: randomized` finds the top
directions by randomized subspace iteration (Halko, Martinsson and Tropp 2011: r + 32 random
directions, 4 power iterations, a generator seeded by the tensor name) at a fraction of the cost
for r much below the matrix size; its error is measured in bench/lora_extract.py.

Each factor and each tensor saved whole goes to disk as soon as it is made
(io.spooled_writer), so memory holds one matrix and its SVD at a time, not the adapter; the
adapter is written into a staged directory that appears only when complete.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .errors import ConfigError, PlanError
from .io.checkpoint import Checkpoint
from .io.lora import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, KEY_PREFIX, open_model
from .io.output_dir import StagedOutput
from .io.spooled_writer import SpooledSafetensorsWriter
from .ops.random import derive_key
from .values import check_seed, is_finite_number, is_integer
from .vocab.names import is_input_embedding, is_vocabulary_tensor

SVD_METHODS = ("exact", "randomized")
# Randomized SVD: extra random directions beyond the rank, and power iterations.
OVERSAMPLE = 32
POWER_ITERATIONS = 4


@dataclass
class ExtractionSettings:
    max_rank: int = 128
    distribute_scale: bool = True
    embed_lora: bool = False
    modules_to_save: Sequence[str] = ()
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    sv_epsilon: float = 0.0
    skip_undecomposable: bool = False
    svd: str = "exact"
    seed: int = 0

    def check(self) -> None:
        if not is_integer(self.max_rank) or self.max_rank < 1:
            raise ConfigError(f"--max-rank must be an integer >= 1, got {self.max_rank!r}")
        if not (is_finite_number(self.sv_epsilon) and self.sv_epsilon >= 0):
            raise ConfigError(f"--sv-epsilon must be a number >= 0, got {self.sv_epsilon!r}")
        check_seed(self.seed)
        for name in ("distribute_scale", "embed_lora", "skip_undecomposable"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.svd not in SVD_METHODS:
            raise ConfigError(f"--svd must be one of {', '.join(SVD_METHODS)}, got {self.svd!r}")
        for flag, patterns in (("--include-regex", self.include), ("--exclude-regex", self.exclude)):
            if isinstance(patterns, str) or not isinstance(patterns, Sequence):  # a str would be read letter by letter
                raise ConfigError(f"{flag}: give a list of regular expressions, e.g. [{patterns!r}]")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{flag} {pattern!r} is not a regular expression ({exc})") from None

    def selects(self, module: str) -> bool:
        if self.include and not any(re.search(r, module) for r in self.include):
            return False
        return not any(re.search(r, module) for r in self.exclude)


@dataclass
class ExtractionReport:
    output_dir: Path
    ranks: dict[str, int]
    saved_whole: list[str]
    bytes_written: int
    seconds: float
    relative_errors: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        worst = max(self.relative_errors.values(), default=0.0)
        return (f"extracted {len(self.ranks)} LoRA updates (rank <= {max(self.ranks.values(), default=0)}) and "
                f"{len(self.saved_whole)} tensors saved whole into {self.output_dir} ({self.bytes_written / 2**20:.1f} MiB) "
                f"in {self.seconds:.2f} s; largest relative error ||D - BA|| / ||D||: {worst:.4f}")


def low_rank_factors(delta: torch.Tensor, max_rank: int, sv_epsilon: float = 0.0, distribute_scale: bool = True,
                     svd: str = "exact", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in fp32 with B @ A the rank-r truncation of `delta` (rows x columns):
    A is r x columns, B is rows x r."""
    matrix = delta.float()
    if svd == "randomized" and max_rank + OVERSAMPLE < min(matrix.shape):
        U, S, Vh = _randomized_svd(matrix, max_rank + OVERSAMPLE, seed)
    else:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    # Zero singular values (and those <= sv_epsilon) carry nothing, so they are not kept.
    rank = min(max_rank, int((S > sv_epsilon).sum()))
    S = S[:rank]
    scale_a, scale_b = (S.sqrt(), S.sqrt()) if distribute_scale else (S, torch.ones_like(S))
    return scale_a[:, None] * Vh[:rank], U[:, :rank] * scale_b[None, :]


def _randomized_svd(matrix: torch.Tensor, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top `width` singular triplets by subspace iteration on a seeded Gaussian start, each
    product re-orthonormalised (QR) so the small directions survive the powers."""
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(matrix.shape[1], width, generator=generator).to(matrix.device)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    U, S, Vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ U, S, Vh


def extract_lora(model: str | Path, base_model: str | Path, out_path: str | Path, *, overwrite: bool = False,
                 allow_pickle: bool = False, quiet: bool = True, device: str | torch.device = "auto",
                 **settings) -> ExtractionReport:
    """Extract a PEFT LoRA adapter of `model` against `base_model` into `out_path`
    (options: ExtractionSettings); the SVDs run on `device` (auto: CUDA when available)."""
    from .engine import resolve_device

    started = time.perf_counter()
    options = ExtractionSettings(**settings)
    options.check()
    torch_device = resolve_device(device)
    tuned, base = open_model(str(model), allow_pickle), open_model(str(base_model), allow_pickle)
    try:
        with (StagedOutput(out_path, [*tuned.sources, *base.sources], overwrite=overwrite,
                           read_files=[*tuned.files, *base.files]) as staged,
              SpooledSafetensorsWriter(staged.path / ADAPTER_SAFETENSORS) as writer):
            ranks, whole, errors = _extract(tuned, base, options, torch_device, quiet, writer)
            written = writer.finish()
            config = _adapter_config(str(base_model), ranks, sorted({_key(n.rpartition(".")[0]) for n in whole}))
            (staged.path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            staged.commit()
    finally:
        tuned.close()
        base.close()
    return ExtractionReport(Path(out_path).expanduser().resolve(), ranks, whole, written, time.perf_counter() - started, errors)


def _key(module: str) -> str:
    """A module's last name component (what peft matches `modules_to_save` against)."""
    return module.rsplit(".", 1)[-1]


def _modules(names: list[str]) -> dict[str, dict[str, str]]:
    """Tensor names grouped by module (the name up to the last dot), in file order:
    {module: {parameter: tensor name}}."""
    modules: dict[str, dict[str, str]] = {}
    for name in names:
        module, _, parameter = name.rpartition(".")
        modules.setdefault(module, {})[parameter] = name
    return modules


def _extract(tuned: Checkpoint, base: Checkpoint, options: ExtractionSettings, device: torch.device, quiet: bool,
             writer: SpooledSafetensorsWriter) -> tuple[dict[str, int], list[str], dict[str, float]]:
    """Each module of the fine-tune is factored (its weight, and its bias delta as lora_B's
    bias), saved whole, or left out, by the rules in the module docstring; what is saved goes
    to `writer`."""
    from tqdm import tqdm

    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    whole: list[str] = []
    for module, parameters in tqdm(_modules(tuned.names).items(), desc="extracting", disable=quiet, leave=False):
        weight = parameters.get("weight")
        info = tuned.info(weight) if weight else None
        is_matrix = info is not None and len(info.shape) == 2 and info.dtype.is_floating_point
        if module in options.modules_to_save or _key(module) in options.modules_to_save:
            action = "whole"
        elif not options.selects(module):
            continue
        elif is_matrix:
            action = "whole" if is_vocabulary_tensor(weight) and not options.embed_lora else "factor"
        elif options.skip_undecomposable:
            continue
        else:
            action = "whole"
        if action == "whole":
            for name in parameters.values():
                writer.add(KEY_PREFIX + name, tuned.tensor(name))
                tuned.release(name)
                whole.append(name)
            continue
        rank = _factor(tuned, base, weight, options, device, writer, errors)
        if rank:
            ranks[weight] = rank
            if "bias" in parameters:
                writer.add(f"{KEY_PREFIX}{module}.lora_B.bias", _delta(tuned, base, parameters["bias"]).to(info.dtype))
    if not len(writer):
        raise PlanError(f"{tuned.path}: nothing to extract (every module was left out)")
    return ranks, whole, errors


def _factor(tuned: Checkpoint, base: Checkpoint, weight: str, options: ExtractionSettings, device: torch.device,
            writer: SpooledSafetensorsWriter, errors: dict[str, float]) -> int:
    """Write one matrix's A and B (its error to `errors`); its rank (0: none kept)."""
    module, dtype = weight.removesuffix(".weight"), tuned.info(weight).dtype
    delta = _delta(tuned, base, weight).to(device)
    transposed = is_input_embedding(weight)
    target = delta.T if transposed else delta
    A, B = low_rank_factors(target, options.max_rank, options.sv_epsilon, options.distribute_scale, options.svd,
                            derive_key(options.seed, weight, 0))
    if A.shape[0] == 0:
        return 0
    norm = target.norm()
    errors[weight] = float((target - B @ A).norm() / norm) if norm > 0 else 0.0
    kind, suffix = ("lora_embedding", "") if transposed else ("lora", ".weight")
    writer.add(f"{KEY_PREFIX}{module}.{kind}_A{suffix}", A.to("cpu", dtype))
    writer.add(f"{KEY_PREFIX}{module}.{kind}_B{suffix}", B.to("cpu", dtype))
    return A.shape[0]


def _delta(tuned: Checkpoint, base: Checkpoint, name: str) -> torch.Tensor:
    if not base.has(name):
        raise PlanError(f"{base.path}: the base model has no tensor {name!r}, which {tuned.path} has")
    if tuple(base.info(name).shape) != tuple(tuned.info(name).shape):
        raise PlanError(f"{name}: shape {list(tuned.info(name).shape)} in {tuned.path} but "
                        f"{list(base.info(name).shape)} in the base model {base.path}")
    delta = tuned.tensor(name).float() - base.tensor(name).float()
    # Without this every page ever read stays resident and RSS grows to both models' size.
    tuned.release(name)
    base.release(name)
    return delta


def _adapter_config(base_model: str, ranks: dict[str, int], modules_to_save: list[str]) -> dict:
    """PEFT's adapter_config.json; every module's alpha equals its rank, so its update is B @ A."""
    top = max(ranks.values(), default=1)
    lower = {name.removesuffix(".weight"): rank for name, rank in ranks.items() if rank != top}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": lower,
        "alpha_pattern": dict(lower),
        "target_modules": sorted({_key(name.removesuffix(".weight")) for name in ranks}),
        "modules_to_save": modules_to_save,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }
