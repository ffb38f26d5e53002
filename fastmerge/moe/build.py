"""Build a mixture of experts from dense models (mergekit-moe's output; the outputs and how one
is chosen: architectures.py).

The base model gives everything outside the MLPs (embeddings, attention, norms, LM head); each
expert (and shared expert) gives its MLP, layer by layer, as mergekit-moe 0.1.5 writes them.
Fused outputs get per layer `mlp.experts.gate_up_proj` [experts, 2 x intermediate, hidden]
(each expert's gate_proj rows, then its up_proj rows) and `mlp.experts.down_proj` [experts,
hidden, intermediate]; the others `mlp.experts.{i}.{gate,up,down}_proj.weight` and the shared
expert's beside them. Every output gets the router `mlp.gate.weight` [experts, hidden]
(gates.py).

Memory: two layers' expert MLPs at a time (one assembled while the other is written), streamed
into the sharded writer, so peak RSS is a small multiple of the largest output tensor, not of
the model. The hidden-state gate modes keep to that too: they run the base model with its
weights read from the file one module at a time (representations.capture.streamed_forward),
where mergekit loads it whole.

A base tensor with no place in the output (a Llama's attention or MLP bias in Mixtral, say) is
an error naming it, where mergekit-moe drops it silently and writes a model that computes
something else.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..dtypes import CONFIG_NAMES
from ..engine import DEFAULT_SHARD_SIZE, reset_peak_rss, peak_rss_bytes, resolve_device
from ..errors import CheckpointError
from ..io.checkpoint import Checkpoint
from ..io.lora import open_model, split_reference
from ..io.output_dir import OutputReport, StagedOutput, copy_model_files, write_model_config
from ..io.writer import ShardedWriter
from ..units import parse_size
from ..values import check_seed, is_integer
from .architectures import MoEArchitecture, select_architecture
from .config import RANDOM_MODES, Expert, MoESpec, load_moe_config
from .gates import degenerate_layers, router_vectors

_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)")
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True)
class MoEReport(OutputReport):
    """What a MoE build wrote; `str(report)` is the CLI's summary."""

    architecture: str
    experts: int
    experts_per_token: int
    layers: int
    gate_mode: str

    def __str__(self) -> str:
        return self.summary(f"built a {self.architecture} model of {self.experts} experts ({self.experts_per_token} "
                            f"per token, {self.layers} layers, gate_mode {self.gate_mode})")


def build_moe(config: str | Path | Mapping[str, Any] | MoESpec, out_dir: str | Path, *, device: str = "auto",
              out_shard_size: str | int = DEFAULT_SHARD_SIZE, seed: int = 0, allow_pickle: bool = False,
              copy_tokenizer: bool = True, overwrite: bool = False, quiet: bool = False,
              allow_all_same: bool = False) -> MoEReport:
    """Build the MoE a mergekit-moe config describes into `out_dir`.

    `seed` seeds the random gate modes and the experts' noise_scale (mergekit's --random-seed);
    `device` is where the hidden-state gate modes run the base model.
    """
    started = time.perf_counter()
    reset_peak_rss()
    check_seed(seed)
    spec = config if isinstance(config, MoESpec) else load_moe_config(config, allow_all_same=allow_all_same)
    max_shard = parse_size(out_shard_size)
    checkpoints: dict[str, Checkpoint] = {}
    try:
        for reference in spec.models():
            if reference not in checkpoints:
                checkpoints[reference] = open_model(reference, allow_pickle=allow_pickle)
        layout = _Layout.of(spec, checkpoints)
        inputs = [Path(split_reference(r)[0]) for r in checkpoints]
        # The output is checked before the routers are made: the hidden-state modes run a model.
        with StagedOutput(out_dir, inputs, overwrite=overwrite,
                          read_files=[f for c in checkpoints.values() for f in c.files]) as staged:
            generator = torch.Generator().manual_seed(seed)
            routers = router_vectors(spec.gate_mode, _routed(spec), layout.base, layout.layers, layout.hidden_size,
                                     generator, resolve_device(device))
            notes = _notes(spec, routers[:, :len(spec.experts)])
            writer = ShardedWriter(staged.path, layout.specs(routers.dtype), max_shard)
            try:
                _write_tensors(layout, routers, generator, writer, quiet)
                writer.finalize()
            finally:
                writer.close()
            copy_model_files(layout.base.directory, staged.path, layout.out_dtype, copy_tokenizer=copy_tokenizer)
            # The base's config.json, copied above with the tokenizer, becomes the MoE's.
            moe_config = layout.architecture.config(layout.base_config, len(spec.experts), spec.experts_per_token,
                                                    len(spec.shared_experts))
            write_model_config(moe_config, staged.path / "config.json", layout.out_dtype)
            final = staged.commit()
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()
    return MoEReport(output_dir=final, architecture=layout.architecture.name, experts=len(spec.experts),
                     experts_per_token=spec.experts_per_token, layers=layout.layers, gate_mode=spec.gate_mode,
                     shards=writer.shard_names, bytes_written=writer.total_bytes,
                     seconds=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes(), notes=notes)


def _routed(spec: MoESpec) -> list[Expert]:
    """The experts that get router vectors, in order: every routed one, then the shared ones
    where they have prompts or the gates are random (mergekit draws theirs then too, whether the
    output has a router for them or not, so later draws line up with mergekit's)."""
    if spec.shared_experts and (spec.shared_experts[0].positive_prompts or spec.gate_mode in RANDOM_MODES):
        return spec.members()
    return list(spec.experts)


@dataclass
class _Layout:
    """The output's tensors: the base's non-MLP ones (`kept`), and per layer the experts' MLPs
    and the routers, laid out as `architecture` wants them."""

    spec: MoESpec
    architecture: MoEArchitecture
    base: Checkpoint
    members: list[Checkpoint]  # each expert's checkpoint, then each shared expert's
    base_config: dict
    layers: int
    hidden_size: int
    kept: list[str]
    zero_biases: list[str]  # q/k/v biases the base lacks, written as zeros
    mlp_shape: tuple[int, int]  # (intermediate, hidden): gate_proj's and up_proj's
    out_dtype: torch.dtype | None

    @classmethod
    def of(cls, spec: MoESpec, checkpoints: dict[str, Checkpoint]) -> _Layout:
        base = checkpoints[spec.base_model]
        members = [checkpoints[e.source_model] for e in spec.members()]
        config = base.required_config("the base model's config is the MoE's starting point")
        architecture = select_architecture(spec, config.get("model_type"))
        for checkpoint in members:
            member_type = (checkpoint.config or {}).get("model_type", config["model_type"])
            if member_type != config["model_type"]:
                raise CheckpointError(f"{checkpoint.path}: model_type {member_type!r}, but the base model's is "
                                      f"{config['model_type']!r}; a MoE's experts have the base's architecture")
        layers, hidden = _int_key(config, "num_hidden_layers", base), _int_key(config, "hidden_size", base)
        kept = [name for name in base.names if _kept(name, architecture, base)]
        zero_biases = [f"model.layers.{layer}.self_attn.{x}_proj.bias" for layer in range(layers) for x in "qkv"
                       if architecture.zero_biases and not base.has(f"model.layers.{layer}.self_attn.{x}_proj.bias")]
        gate = _mlp_name(0, "gate_proj")
        if not base.has(gate):
            raise CheckpointError(f"{base.path}: no tensor {gate!r}; the base model must be a dense model")
        shape = tuple(base.info(gate).shape)
        if len(shape) != 2 or shape[1] != hidden:
            raise CheckpointError(f"{base.path}: {gate} has shape {list(shape)}, not [intermediate, {hidden}]")
        for checkpoint in members:
            _check_member_mlps(checkpoint, layers, shape)
        return cls(spec, architecture, base, members, config, layers, hidden, kept, zero_biases, shape,
                   spec.dtype or _config_dtype(config))

    def specs(self, router_dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        out = [(name, self._dtype(self.base, name), tuple(self.base.info(name).shape)) for name in self.kept]
        out.extend((bias, *self.zero_bias(bias)) for bias in self.zero_biases)
        for layer in range(self.layers):
            out.extend((name, dtype, shape) for name, dtype, shape, _ in self.layer_parts(layer))
        experts, shared = len(self.spec.experts), len(self.spec.shared_experts)
        for layer in range(self.layers):
            out.append((_router_name(layer), self.out_dtype or router_dtype, (experts, self.hidden_size)))
            if self.architecture.shared_router:
                out.append((_shared_router_name(layer), self.out_dtype or router_dtype, (shared, self.hidden_size)))
        return out

    def layer_parts(self, layer: int) -> list[tuple[str, torch.dtype, tuple[int, ...], list[tuple[int, str]]]]:
        """One layer's expert tensors: (name, dtype, shape, the (member, projection) inputs it holds)."""
        intermediate, hidden = self.mlp_shape
        experts = range(len(self.spec.experts))
        if self.architecture.fused:
            dtype = self.out_dtype or self.base.info(_mlp_name(0, "gate_proj")).dtype
            n = len(experts)
            return [(f"model.layers.{layer}.mlp.experts.gate_up_proj", dtype, (n, 2 * intermediate, hidden),
                     [(e, p) for e in experts for p in ("gate_proj", "up_proj")]),
                    (f"model.layers.{layer}.mlp.experts.down_proj", dtype, (n, hidden, intermediate),
                     [(e, "down_proj") for e in experts])]
        parts = []
        for m, checkpoint in enumerate(self.members):
            module = f"experts.{m}" if m < len(experts) else self.architecture.shared_name
            for p in _PROJECTIONS:
                source = _mlp_name(layer, p)
                parts.append((f"model.layers.{layer}.mlp.{module}.{p}.weight", self._dtype(checkpoint, source),
                              tuple(checkpoint.info(source).shape), [(m, p)]))
        return parts

    def zero_bias(self, bias: str) -> tuple[torch.dtype, tuple[int]]:
        """A missing q/k/v bias's dtype (mergekit's: fp32 without a config dtype) and shape."""
        return self.out_dtype or torch.float32, (self.base.info(bias.removesuffix(".bias") + ".weight").shape[0],)

    def _dtype(self, checkpoint: Checkpoint, name: str) -> torch.dtype:
        return self.out_dtype or checkpoint.info(name).dtype


def _kept(name: str, architecture: MoEArchitecture, base: Checkpoint) -> bool:
    """Whether the output keeps base tensor `name`; an error for one it has no place for."""
    mlp = _MLP.fullmatch(name)
    if mlp and mlp.group(2) in {f"{p}.weight" for p in _PROJECTIONS}:
        return False  # the experts' part
    if mlp:
        raise CheckpointError(f"{base.path}: tensor {name!r} has no place in a {architecture.name} model, "
                              "whose experts have gate, up and down projection weights only")
    if name.endswith("rotary_emb.inv_freq"):
        return False  # a buffer older checkpoints saved; transformers recomputes it
    if not architecture.kept.fullmatch(name):
        raise CheckpointError(f"{base.path}: tensor {name!r} has no place in a {architecture.name} model "
                              "(mergekit-moe would drop it and write a model that computes something else)")
    return True


def _write_tensors(layout: _Layout, routers: torch.Tensor, generator: torch.Generator, writer: ShardedWriter,
                   quiet: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    base = layout.base
    for name in layout.kept:
        writer.write(name, _cast(base.tensor(name), layout.out_dtype))
        base.release(name)
    for bias in layout.zero_biases:
        dtype, shape = layout.zero_bias(bias)
        writer.write(bias, torch.zeros(shape, dtype=dtype))
    used = list({id(c): c for c in layout.members}.values())

    def release(layer: int) -> None:
        for checkpoint in used:
            for projection in _PROJECTIONS:
                checkpoint.release(_mlp_name(layer, projection))

    # One layer is written on a second thread while the next is assembled (two layers in memory).
    with ThreadPoolExecutor(max_workers=1) as writing:
        pending = None
        for layer in tqdm(range(layout.layers), desc="experts", disable=quiet, leave=False):
            parts = _assemble(layout, layer, generator)
            release(layer)  # nothing assembled is a view of the inputs
            if pending is not None:
                pending.result()
            pending = writing.submit(lambda parts=parts: [writer.write(name, t) for name, t in parts])
        if pending is not None:
            pending.result()
    experts = len(layout.spec.experts)
    for layer in range(layout.layers):
        writer.write(_router_name(layer), _cast(routers[layer, :experts], layout.out_dtype).contiguous())
        if layout.architecture.shared_router:
            writer.write(_shared_router_name(layer), _cast(routers[layer, experts:], layout.out_dtype).contiguous())


def _assemble(layout: _Layout, layer: int, generator: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    """One layer's expert tensors, with each member's noise drawn in mergekit's order. None is a
    view of a checkpoint's mapping, so the inputs can be released at once (a page read after its
    release would stay resident)."""
    architecture, members = layout.architecture, layout.spec.members()
    projections = architecture.noise_order
    order = ([(m, p) for p in projections for m in range(len(members))] if architecture.noise_by_projection
             else [(m, p) for m in range(len(members)) for p in projections])
    inputs, mapped = {}, {}
    for m, p in order:
        member = members[m]
        mapped[m, p] = layout.members[m].tensor(_mlp_name(layer, p))
        tensor = _noised(mapped[m, p], member.noise_scale, generator)
        if p == "down_proj" and member.residual_scale is not None:
            tensor = tensor * member.residual_scale
        inputs[m, p] = tensor
    parts = []
    for name, dtype, shape, sources in layout.layer_parts(layer):
        if len(sources) == 1:
            part = _cast(inputs[sources[0]], dtype)
            parts.append((name, part.clone() if part is mapped[sources[0]] else part))
            continue
        stacked = torch.empty(shape, dtype=dtype)  # fused: the sources fill it row block by row block
        rows = stacked.view(-1, shape[-1])
        at = 0
        for source in sources:
            block = inputs[source]
            rows[at:at + block.shape[0]].copy_(block)
            at += block.shape[0]
        parts.append((name, stacked))
    return parts


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


def _shared_router_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def _int_key(config: dict, key: str, base: Checkpoint) -> int:
    value = config.get(key)
    if not is_integer(value) or value < 1:
        raise CheckpointError(f"{base.path}/config.json: `{key}` must be a positive integer, got {value!r}")
    return value


def _config_dtype(config: dict) -> torch.dtype | None:
    """The dtype the base's config.json names (mergekit's default output dtype), if it names one."""
    name = config.get("dtype", config.get("torch_dtype"))
    return CONFIG_NAMES.get(name.lower()) if isinstance(name, str) else None


def _check_member_mlps(checkpoint: Checkpoint, layers: int, gate_shape: tuple[int, int]) -> None:
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
