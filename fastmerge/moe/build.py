"""Build a mixture of experts from dense models (mergekit-moe's output; the outputs and how one
is chosen: architectures.py).

The base model gives everything outside the MLPs (embeddings, attention, norms, LM head); each
expert gives its MLP, layer by layer. Tensors are written in transformers' fused expert layout,
as mergekit-moe 0.1.5 writes them: per layer `mlp.experts.gate_up_proj` [experts, 2 x
intermediate, hidden] (each expert's gate_proj rows, then its up_proj rows),
`mlp.experts.down_proj` [experts, hidden, intermediate] and the router `mlp.gate.weight`
[experts, hidden] (gates.py).

Memory: one layer's expert MLPs at a time, streamed into the sharded writer, so peak RSS is a
small multiple of the largest output tensor (a layer's gate_up_proj), not of the model. The
hidden-state gate modes are the exception: they load the base model whole, as mergekit does.

A base tensor with no place in the output (a Llama's attention or MLP bias in Mixtral, say) is
an error naming it, where mergekit-moe drops it silently and writes a model that computes
something else.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..dtypes import CONFIG_NAMES
from ..engine import DEFAULT_SHARD_SIZE, _reset_peak_rss, peak_rss_bytes, resolve_device
from ..errors import CheckpointError
from ..io.checkpoint import Checkpoint
from ..io.lora import open_model, split_reference
from ..io.output_dir import StagedOutput, copy_model_files, write_model_config
from ..io.writer import ShardedWriter
from ..units import format_size, parse_size, shards_summary
from .architectures import MoEArchitecture, select_architecture
from .config import MoESpec, load_moe_config
from .gates import degenerate_layers, router_vectors

_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)")
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class MoEReport:
    """What a MoE build wrote; `str(report)` is the CLI's summary."""

    output_dir: Path
    architecture: str
    experts: int
    experts_per_token: int
    layers: int
    gate_mode: str
    shards: list[str]
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"built a {self.architecture} model of {self.experts} experts ({self.experts_per_token} per token, {self.layers} layers, "
            f"gate_mode {self.gate_mode}) into {self.output_dir} ({shards_summary(len(self.shards), self.bytes_written)}) "
            f"in {self.seconds:.2f} s, "
            f"peak RSS {format_size(self.peak_rss_bytes)}"
        ) + "".join(f"\nnote: {note}" for note in self.notes)


def build_moe(config: str | Path | Mapping[str, Any] | MoESpec, out_dir: str | Path, *, device: str = "auto",
              out_shard_size: str | int = DEFAULT_SHARD_SIZE, seed: int = 0, allow_pickle: bool = False,
              copy_tokenizer: bool = True, overwrite: bool = False, quiet: bool = False,
              allow_all_same: bool = False) -> MoEReport:
    """Build the MoE a mergekit-moe config describes into `out_dir`.

    `seed` seeds the random gate modes and the experts' noise_scale (mergekit's --random-seed);
    `device` is where the hidden-state gate modes run the base model.
    """
    started = time.perf_counter()
    _reset_peak_rss()
    spec = config if isinstance(config, MoESpec) else load_moe_config(config, allow_all_same=allow_all_same)
    max_shard = parse_size(out_shard_size)
    checkpoints: dict[str, Checkpoint] = {}
    try:
        for reference in spec.models():
            if reference not in checkpoints:
                checkpoints[reference] = open_model(reference, allow_pickle=allow_pickle)
        base = checkpoints[spec.base_model]
        layout = _Layout.of(spec, base, [checkpoints[e.source_model] for e in spec.experts])
        inputs = [Path(split_reference(r)[0]) for r in checkpoints]
        # The output is checked before the routers are made: the hidden-state modes run a model.
        with StagedOutput(out_dir, inputs, overwrite=overwrite) as staged:
            generator = torch.Generator().manual_seed(seed)
            routers = router_vectors(spec, base, layout.layers, layout.hidden_size, generator, resolve_device(device))
            notes = _notes(spec, routers)
            writer = ShardedWriter(staged.path, layout.specs(routers.dtype), max_shard)
            try:
                _write_tensors(spec, layout, checkpoints, routers, generator, writer, quiet)
                writer.finalize()
            finally:
                writer.close()
            copy_model_files(base.directory, staged.path, layout.out_dtype, copy_tokenizer=copy_tokenizer)
            # The base's config.json, copied above with the tokenizer, becomes the MoE's.
            write_model_config(layout.architecture.config(layout.base_config, len(spec.experts), spec.experts_per_token),
                               staged.path / "config.json", layout.out_dtype)
            final = staged.commit()
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()
    return MoEReport(final, layout.architecture.name, len(spec.experts), spec.experts_per_token, layout.layers, spec.gate_mode,
                     writer.shard_names, writer.total_bytes, time.perf_counter() - started, peak_rss_bytes(), notes)


@dataclass
class _Layout:
    """The output's tensors: the base's non-MLP ones (`kept`), and per layer the experts' fused
    MLP and the router."""

    architecture: MoEArchitecture
    base_config: dict
    layers: int
    hidden_size: int
    experts: int
    kept: list[str]
    mlp_dtype: torch.dtype
    gate_shape: tuple[int, int]  # (intermediate, hidden): gate_proj's and up_proj's
    out_dtype: torch.dtype | None
    base: Checkpoint

    @classmethod
    def of(cls, spec: MoESpec, base: Checkpoint, experts: list[Checkpoint]) -> _Layout:
        config = _model_config(base)
        architecture = select_architecture(spec.architecture, config.get("model_type"), spec.base_model)
        for checkpoint in experts:
            expert_type = (checkpoint.config or {}).get("model_type", config["model_type"])
            if expert_type != config["model_type"]:
                raise CheckpointError(f"{checkpoint.path}: model_type {expert_type!r}, but the base model's is "
                                      f"{config['model_type']!r}; a MoE's experts have the base's architecture")
        layers, hidden = _int_key(config, "num_hidden_layers", base), _int_key(config, "hidden_size", base)
        kept = []
        for name in base.names:
            mlp = _MLP.fullmatch(name)
            if mlp and mlp.group(2) in {f"{p}.weight" for p in _PROJECTIONS}:
                continue
            if mlp:
                raise CheckpointError(f"{base.path}: tensor {name!r} has no place in a {architecture.name} model, "
                                      "whose experts have gate, up and down projection weights only")
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer older checkpoints saved; transformers recomputes it
            if not architecture.kept.fullmatch(name):
                raise CheckpointError(f"{base.path}: tensor {name!r} has no place in a {architecture.name} model "
                                      "(mergekit-moe would drop it and write a model that computes something else)")
            kept.append(name)
        gate = _mlp_name(0, "gate_proj")
        if not base.has(gate):
            raise CheckpointError(f"{base.path}: no tensor {gate!r}; the base model must be a dense model")
        shape = tuple(base.info(gate).shape)
        if len(shape) != 2 or shape[1] != hidden:
            raise CheckpointError(f"{base.path}: {gate} has shape {list(shape)}, not [intermediate, {hidden}]")
        for checkpoint in experts:
            _check_expert_mlps(checkpoint, layers, shape)
        out_dtype = spec.dtype or _config_dtype(config)
        return cls(architecture, config, layers, hidden, len(spec.experts), kept, base.info(gate).dtype, shape, out_dtype, base)

    def specs(self, router_dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        out = [(name, self.out_dtype or self.base.info(name).dtype, tuple(self.base.info(name).shape)) for name in self.kept]
        intermediate, hidden = self.gate_shape
        mlp_dtype = self.out_dtype or self.mlp_dtype
        for layer in range(self.layers):
            out.append((f"model.layers.{layer}.mlp.experts.gate_up_proj", mlp_dtype, (self.experts, 2 * intermediate, hidden)))
            out.append((f"model.layers.{layer}.mlp.experts.down_proj", mlp_dtype, (self.experts, hidden, intermediate)))
        for layer in range(self.layers):
            out.append((_router_name(layer), self.out_dtype or router_dtype, (self.experts, hidden)))
        return out


def _write_tensors(spec: MoESpec, layout: _Layout, checkpoints: dict[str, Checkpoint], routers: torch.Tensor,
                   generator: torch.Generator, writer: ShardedWriter, quiet: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    base = layout.base
    for name in layout.kept:
        writer.write(name, _cast(base.tensor(name), layout.out_dtype))
        base.release(name)
    mlp_dtype = layout.out_dtype or layout.mlp_dtype
    intermediate, hidden = layout.gate_shape
    used = list({id(c): c for c in (checkpoints[e.source_model] for e in spec.experts)}.values())
    # One layer is written on a second thread while the next is assembled (two layers in memory).
    with ThreadPoolExecutor(max_workers=1) as writing:
        pending = None
        for layer in tqdm(range(layout.layers), desc="experts", disable=quiet, leave=False):
            gate_up = torch.empty((layout.experts, 2 * intermediate, hidden), dtype=mlp_dtype)
            down = torch.empty((layout.experts, hidden, intermediate), dtype=mlp_dtype)
            # Noise is drawn from one stream, in mergekit's order (the architecture's).
            for e, expert in enumerate(spec.experts):
                checkpoint = checkpoints[expert.source_model]
                w = {p: _noised(checkpoint.tensor(_mlp_name(layer, p)), expert.noise_scale, generator)
                     for p in layout.architecture.noise_order}
                if expert.residual_scale is not None:
                    w["down_proj"] = w["down_proj"] * expert.residual_scale
                gate_up[e, :intermediate].copy_(w["gate_proj"])
                gate_up[e, intermediate:].copy_(w["up_proj"])
                down[e].copy_(w["down_proj"])
            for checkpoint in used:  # every read is copied by now
                for projection in _PROJECTIONS:
                    checkpoint.release(_mlp_name(layer, projection))
            if pending is not None:
                pending.result()
            pending = writing.submit(_write_layer, writer, layer, gate_up, down)
        if pending is not None:
            pending.result()
    for layer in range(layout.layers):
        writer.write(_router_name(layer), _cast(routers[layer], layout.out_dtype).contiguous())


def _write_layer(writer: ShardedWriter, layer: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    writer.write(f"model.layers.{layer}.mlp.experts.gate_up_proj", gate_up)
    writer.write(f"model.layers.{layer}.mlp.experts.down_proj", down)


def _noised(tensor: torch.Tensor, scale: float | None, generator: torch.Generator) -> torch.Tensor:
    """mergekit's noise_scale: Gaussian noise drawn and added in the tensor's own dtype."""
    if scale is None:
        return tensor
    return tensor + torch.randn(tensor.shape, dtype=tensor.dtype, generator=generator) * scale


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None else tensor.to(dtype)


def _mlp_name(layer: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.{projection}.weight"


def _router_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def _model_config(base: Checkpoint) -> dict:
    if base.config is None:
        raise CheckpointError(f"{base.path}: no config.json; the base model's config is the MoE's starting point")
    return base.config


def _int_key(config: dict, key: str, base: Checkpoint) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{base.path}/config.json: `{key}` must be a positive integer, got {value!r}")
    return value


def _config_dtype(config: dict) -> torch.dtype | None:
    """The dtype the base's config.json names (mergekit's default output dtype), if it names one."""
    name = config.get("dtype", config.get("torch_dtype"))
    return CONFIG_NAMES.get(name.lower()) if isinstance(name, str) else None


def _check_expert_mlps(checkpoint: Checkpoint, layers: int, gate_shape: tuple[int, int]) -> None:
    intermediate, hidden = gate_shape
    wanted = {"gate_proj": [intermediate, hidden], "up_proj": [intermediate, hidden], "down_proj": [hidden, intermediate]}
    for layer in range(layers):
        for projection, shape in wanted.items():
            name = _mlp_name(layer, projection)
            if not checkpoint.has(name):
                raise CheckpointError(f"{checkpoint.path}: no tensor {name!r}; every expert needs the base's "
                                      f"{layers} layers of MLP weights")
            if list(checkpoint.info(name).shape) != shape:
                raise CheckpointError(f"{checkpoint.path}: {name} has shape {list(checkpoint.info(name).shape)}, but "
                                      f"the base model's is {shape}; a MoE's experts share one shape")


def _notes(spec: MoESpec, routers: torch.Tensor) -> list[str]:
    notes = []
    degenerate = degenerate_layers(routers)
    if degenerate:
        which = "every layer" if len(degenerate) == routers.shape[0] else "layers " + ", ".join(map(str, degenerate))
        notes.append(f"{which}: the router vectors are nearly dependent (condition number above 5), so some experts "
                     "will be hard to tell apart; make the prompts more different")
    experts = len(spec.experts)
    if experts & (experts - 1):
        notes.append(f"{experts} experts is not a power of two, which llama.cpp cannot load")
    return notes
