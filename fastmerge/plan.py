"""MergeSpec + the input checkpoints' headers -> a Plan: every output tensor, where its inputs come
from, and its parameters resolved (gradients over depth, filters, precedence).

Planning reads headers only, so `fastmerge plan` is instant and every structural error (missing
tensor, shape mismatch, unknown parameter, missing weight) surfaces before a byte is written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch

from .config import MergeSpec, SliceSpec, SourceSpec, evaluate_setting
from .dtypes import merged_dtype
from .errors import ConfigError, PlanError
from .io.checkpoint import Checkpoint
from .io.lora import AdaptedCheckpoint, open_model
from .methods.base import MergeMethod
from .units import format_size
from .values import is_number
from .vocab.align import RowOverride, VocabularyAlignment
from .vocab.build import OutputVocabulary, build_output_vocabulary, parse_tokenizer_source
from .vocab.chat_templates import resolve_chat_template
from .vocab.names import is_output_embedding, is_vocabulary_tensor, tied_source
from .vocab.tokens import MODEL, ZERO

# `model.layers.12.mlp.up_proj.weight`, `transformer.h.3.attn.c_attn.weight`, `blocks.0.x`, ...
_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)(?P<suffix>\..+)$")
# Non-layer tensors that sit before the decoder stack (the rest sit after it).
_PRE_LAYER_HINTS = ("embed", "wte", "wpe", "tok_embeddings", "word_embeddings")
# Buffers that older conversions saved but transformers recomputes from the config (RoPE's
# inverse frequencies): no weights, so a merge leaves them out, as mergekit's architecture
# tables do, whichever models have them.
_RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq",)
# A flat merge's rule for a tensor that not every model has (mergekit-pytorch's flags): stop with
# an error, merge it from the models that have it (--tensor-union), or leave it out
# (--tensor-intersection).
FLAT_MISSING = ("error", "union", "intersection")


def tensors_by_name(names: Iterable[str], sources: list, has: Callable[[Any, str], bool], missing: str,
                    what: Callable[[list], str], hint: str) -> tuple[list[tuple[str, list]], list[str]]:
    """Apply a flat merge's rule for missing tensors (FLAT_MISSING) once, for files and for state
    dicts alike: (name, the sources that have it) for each tensor to merge, and the names left
    out. `has(source, name)` says whether a source holds a tensor; `what(sources)` names sources
    for the error, whose `hint` says how to get past it."""
    if missing not in FLAT_MISSING:
        raise ConfigError(f"missing={missing!r} is no rule for tensors some models lack; use one of {', '.join(FLAT_MISSING)}")
    kept, left_out = [], []
    for name in names:
        present = [s for s in sources if has(s, name)]
        if len(present) < len(sources):
            if missing == "intersection":
                left_out.append(name)
                continue
            if missing == "error":
                raise PlanError(f"tensor {name} is missing from {what([s for s in sources if s not in present])}; {hint}")
        kept.append((name, present))
    return kept, left_out


def layer_count(checkpoint: Checkpoint) -> int:
    """A model's number of layers: config.json's num_hidden_layers, else one past the highest
    layer index in its tensor names."""
    config_layers = (checkpoint.config or {}).get("num_hidden_layers")
    indices = [i for i in map(layer_index, checkpoint.names) if i is not None]
    return int(config_layers) if isinstance(config_layers, int) else (max(indices) + 1 if indices else 0)


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to, parsed from its name (no per-architecture table)."""
    match = _LAYER_NAME.match(name)
    return int(match["index"]) if match else None


def _is_recomputed_buffer(name: str) -> bool:
    return name.endswith(_RECOMPUTED_BUFFERS)


def with_layer_index(name: str, index: int) -> str:
    match = _LAYER_NAME.match(name)
    assert match is not None, name
    return f"{match['prefix']}.{index}{match['suffix']}"


@dataclass(frozen=True)
class TensorRef:
    """One input tensor: which checkpoint (index into Plan.checkpoints) and its name there."""

    checkpoint: int
    name: str


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    inputs: list[TensorRef]
    base: TensorRef | None
    params: list[dict[str, Any]]
    global_params: dict[str, Any]
    layer: int | None
    # Non-float tensors (integer buffers) are copied from the first input, not merged.
    copy_only: bool = False
    # Token-indexed tensors whose inputs must be re-indexed to the output vocabulary first.
    vocab: VocabularyAlignment | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Plan:
    spec: MergeSpec
    method: MergeMethod
    checkpoints: list[Checkpoint]
    checkpoint_names: list[str]
    input_models: list[str]
    base_model: str | None
    tensors: list[PlannedTensor]
    layer_count: int | None
    output_config: dict[str, Any] | None
    config_source: Checkpoint | None
    input_bytes_by_tensor: dict[str, int] = field(default_factory=dict)
    # The tokenizer built for `tokenizer_source` (None: the donor's files are copied as they are).
    vocabulary: OutputVocabulary | None = None
    # Jinja text for the output's tokenizer_config.json (`chat_template`), resolved from the config.
    chat_template: str | None = None
    # What the user should know about this merge (`fastmerge plan` and the report print them).
    notes: list[str] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def input_bytes(self) -> int:
        return sum(self.input_bytes_by_tensor.values())

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.nbytes for t in self.tensors), default=0)

    def estimated_peak_bytes(self) -> int:
        """Working set of the streaming merge: the inputs of the largest tensor (mapped pages),
        an fp32 accumulator and the output buffer; page cache is not counted."""
        worst = 0
        for tensor in self.tensors:
            refs = tensor.inputs + ([tensor.base] if tensor.base else [])
            inputs = sum(self.checkpoints[r.checkpoint].info(r.name).nbytes for r in refs)
            numel = math.prod(tensor.shape)
            worst = max(worst, inputs + 4 * numel + tensor.nbytes)
        return worst

    def summary(self) -> str:
        lines = [
            f"method:        {self.spec.merge_method}",
            f"base model:    {self.base_model or '(none)'}",
            "models:        " + (", ".join(self.input_models) or "(none)"),
            f"tensors:       {len(self.tensors)}"
            + (f" ({self.layer_count} layers)" if self.layer_count is not None else ""),
            f"input bytes:   {format_size(self.input_bytes)}",
            f"output size:   {format_size(self.output_bytes)}",
            f"largest tensor: {format_size(self.largest_tensor_bytes)}",
            f"est. peak mem: {format_size(self.estimated_peak_bytes())} (+ interpreter and libraries)",
        ]
        lines += [f"LoRA adapter:  {c.summary()}" for c in self.checkpoints if isinstance(c, AdaptedCheckpoint)]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def open_checkpoints(spec: MergeSpec, allow_pickle: bool = False) -> dict[str, Checkpoint]:
    """Open every model the config names (headers only, LoRA adapters applied as tensors are
    read), keyed by the name used in the config."""
    return {name: open_model(name, allow_pickle=allow_pickle) for name in spec.referenced_models()}


def build_plan(spec: MergeSpec, method: MergeMethod, checkpoints: dict[str, Checkpoint],
               truncate_embeddings: bool = False, flat: str | None = None) -> Plan:
    """Resolve every output tensor of the merge described by `spec`; `truncate_embeddings` is
    mergekit's --unsafe-truncate-embeddings (see _PlanBuilder._truncated). With `flat` (one of
    FLAT_MISSING) the merge is mergekit-pytorch's: every tensor by name, no layer structure
    (see _PlanBuilder.build_flat)."""
    check_parameter_names(spec, method)
    builder = _PlanBuilder(spec, method, checkpoints, _output_vocabulary(spec, checkpoints), truncate_embeddings)
    if flat is None:
        return builder.build()
    return builder.build_flat(flat)


def _output_vocabulary(spec: MergeSpec, checkpoints: dict[str, Checkpoint]) -> OutputVocabulary | None:
    """The vocabulary `tokenizer_source` asks for; None when unset (mergekit then copies the
    base's tokenizer and requires every token-indexed tensor to have the same size)."""
    if spec.tokenizer_source is None:
        return None
    names = spec.referenced_models()
    return build_output_vocabulary(parse_tokenizer_source(spec.tokenizer_source), names[0], names, checkpoints,
                                   list(spec.tokens), spec.pad_to_multiple_of)


# Per-model parameters every method accepts: `mask` (a masks.safetensors file from
# `fastmerge prune`) restricts the model's task vector before the method sees it.
UNIVERSAL_MODEL_PARAMS = {"mask": None}


def check_parameter_names(spec: MergeSpec, method: MergeMethod) -> None:
    """Every parameter the config sets must be one the method (or every method) reads."""
    allowed_model = set(method.model_params) | set(method.required_model_params) | set(UNIVERSAL_MODEL_PARAMS)
    allowed = allowed_model | set(method.global_params)
    places: list[tuple[str, dict[str, Any], set[str]]] = [("parameters", spec.parameters, allowed)]
    for i, source in enumerate(spec.models or []):
        places.append((f"models[{i}].parameters", source.parameters, allowed_model))
    for i, out_slice in enumerate(spec.slices or []):
        places.append((f"slices[{i}].parameters", out_slice.parameters, allowed))
        for j, source in enumerate(out_slice.sources):
            places.append((f"slices[{i}].sources[{j}].parameters", source.parameters, allowed_model))
    for where, params, names in places:
        for name in params:
            if name not in names:
                known = ", ".join(sorted(names)) or "none"
                raise ConfigError(
                    f"unknown parameter `{where}.{name}` for merge_method {spec.merge_method}; it accepts: {known}"
                )


class _PlanBuilder:
    def __init__(self, spec: MergeSpec, method: MergeMethod, checkpoints: dict[str, Checkpoint],
                 vocabulary: OutputVocabulary | None = None, truncate_embeddings: bool = False):
        self.spec = spec
        self.method = method
        self.vocabulary = vocabulary
        self.truncate_embeddings = truncate_embeddings
        self.truncated_rows: int | None = None
        self.notes: list[str] = []
        self.names = list(checkpoints)
        self.checkpoints = [checkpoints[n] for n in self.names]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.tensors: list[PlannedTensor] = []
        self.input_bytes: dict[str, int] = {}

    # -- structure -----------------------------------------------------------------------
    def build(self) -> Plan:
        spec = self.spec
        self._check_base()
        slices = spec.slices or [self._models_slice()]
        template = self._template(slices[0])
        template_layers = layer_count(template)

        pre, post, layer_names = self._split_names(template.names)
        post += self._untied_output_embeddings(slices[0], template)
        self._plan_non_layer(pre, slices[0])
        out_layers = 0
        for out_slice in slices:
            out_layers = self._plan_slice(out_slice, layer_names, template_layers, out_layers)
        self._plan_non_layer(post, slices[-1])

        if not self.tensors:
            raise PlanError(f"nothing to merge: {template.path} has no tensors")
        self._check_every_tensor_is_planned(slices)
        buffers = sorted({n for c in self.checkpoints for n in c.names if _is_recomputed_buffer(n)})
        if buffers:
            self.notes.append(f"left out {len(buffers)} saved rotary_emb.inv_freq buffer(s), which transformers "
                              "recomputes from the config (as mergekit does)")
        return self._plan(slices[0], template, out_layers if layer_names else None, template_layers)

    def _check_every_tensor_is_planned(self, slices: list[SliceSpec]) -> None:
        """The output's tensor names come from one model (the template: the base, else the first
        model; in slices each slice's first source names its layers), so a tensor that another
        model has in the part of it the merge takes would otherwise be dropped without a word, as
        would one the template lacks (a shard its index forgets): the written model would miss
        it. A `models:` merge takes every model whole; a slice takes its sources' layers in
        their ranges, the first slice their tensors before the layers, the last those after."""
        used = {(ref.checkpoint, ref.name) for t in self.tensors for ref in t.inputs + ([t.base] if t.base else [])}
        template = self._base_name(slices[0]) or slices[0].sources[0].model
        for position, out_slice in enumerate(slices):
            layers_from = out_slice.sources[0].model if self.spec.slices is not None else template
            for source in out_slice.sources:
                pre, post, layers = self._split_names(self.checkpoints[self.index[source.model]].names)
                start, end = source.layer_range if self.spec.slices is not None else (0, max(layers, default=-1) + 1)
                taken = [(n, layers_from) for layer in range(start, end) for n in layers.get(layer, [])]
                taken += [(n, template) for n in (pre if position == 0 else []) + (post if position == len(slices) - 1 else [])]
                for name, named_by in taken:
                    if (self.index[source.model], name) not in used:
                        raise PlanError(f"tensor {name} is missing from model {named_by}, whose tensor names the "
                                        f"merge takes, though model {source.model} has it (the output would lack it); "
                                        "give every model the same tensors")

    def build_flat(self, missing: str) -> Plan:
        """mergekit-pytorch's merge of arbitrary checkpoints: every tensor name of the `models:`
        entries (the base adds none of its own, as there), each merged by name, with no layer
        structure, from the models that have it; `missing` (FLAT_MISSING) says what happens
        when some model lacks it. A base that lacks a tensor the method needs it for is an error."""
        spec = self.spec
        if spec.slices is not None:
            raise ConfigError("a flat merge (fastmerge pytorch, mergekit-pytorch's format) takes `models:`, not "
                              "`slices:`; `fastmerge run` merges slices")
        self._check_base()
        out_slice = self._models_slice()
        names = dict.fromkeys(n for s in spec.models or [] for n in self.checkpoints[self.index[s.model]].names)
        kept, left_out = tensors_by_name(
            names, out_slice.sources, lambda s, name: self.checkpoints[self.index[s.model]].has(name), missing,
            lambda lacking: ", ".join(s.model for s in lacking),
            "merge only the tensors every model has (--tensor-intersection, -i) or each from the models that have it "
            "(--tensor-union, -u)")
        for name, present in kept:
            base = spec.base_model
            if base is not None and self.method.uses_base and not self.checkpoints[self.index[base]].has(name):
                raise PlanError(f"tensor {name} is missing from the base model {base}, which merge_method "
                                f"{spec.merge_method} needs for it; leave it out with --tensor-intersection (-i)")
            here = replace(out_slice, sources=present)
            if not self._merge_sources(here):
                raise PlanError(f"tensor {name}: only the base model has it, so there is nothing to merge into it; "
                                "leave it out with --tensor-intersection (-i)")
            self._plan_tensor(name, here, {s.model: name for s in present}, None, 0.0, name)
        if left_out:
            self.notes.append(f"{len(left_out)} tensor(s) not in every model left out (--tensor-intersection): "
                              + ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else ""))
        if not self.tensors:
            raise PlanError("nothing to merge: no tensor is in every model" if left_out else "nothing to merge: the models have no tensors")
        return self._plan(out_slice, self._template(out_slice), None, 0)

    def _check_base(self) -> None:
        spec = self.spec
        if self.method.requires_base and not (spec.base_model or any(s.base_model for s in spec.slices or [])):
            raise ConfigError(f"merge_method {spec.merge_method} needs a `base_model`")

    def _plan(self, first_slice: SliceSpec, template: Checkpoint, out_layers: int | None, in_layers: int) -> Plan:
        base_name = self._base_name(first_slice)
        config_source = self.checkpoints[self.index[base_name]] if base_name else template
        return Plan(
            spec=self.spec,
            method=self.method,
            checkpoints=self.checkpoints,
            checkpoint_names=self.names,
            input_models=self._input_models(first_slice),
            base_model=base_name,
            tensors=self._in_file_order(),
            layer_count=out_layers,
            output_config=self._output_config(config_source, out_layers, in_layers),
            config_source=config_source,
            input_bytes_by_tensor=self.input_bytes,
            vocabulary=self.vocabulary,
            chat_template=self._chat_template(config_source),
            notes=self.notes,
        )

    def _template(self, first_slice: SliceSpec) -> Checkpoint:
        """Tensor names and shapes come from the base model, else the first source."""
        name = self._base_name(first_slice) or first_slice.sources[0].model
        return self.checkpoints[self.index[name]]

    @staticmethod
    def _split_names(names: Iterable[str]) -> tuple[list[str], list[str], dict[int, list[str]]]:
        """A model's tensor names: those before the layers, those after, and each layer's (no
        recomputed buffers)."""
        pre, post, layers = [], [], {}
        for name in names:
            if _is_recomputed_buffer(name):
                continue
            index = layer_index(name)
            if index is not None:
                layers.setdefault(index, []).append(name)
            elif any(hint in name for hint in _PRE_LAYER_HINTS):
                pre.append(name)
            else:
                post.append(name)
        return pre, post, layers

    def _untied_output_embeddings(self, first_slice: SliceSpec, template: Checkpoint) -> list[str]:
        """Output embeddings (lm_head) that some input model has but the template lacks because
        its embeddings are tied. As in mergekit, the output then has the tensor, and the tied
        models contribute their input embedding to it (see `_ref`)."""
        models = [s.model for s in first_slice.sources] + [b for b in [self._base_name(first_slice)] if b]
        found: list[str] = []
        for model in models:
            for name in self.checkpoints[self.index[model]].names:
                if is_output_embedding(name) and not template.has(name) and name not in found:
                    found.append(name)
        return found

    def _base_name(self, out_slice: SliceSpec) -> str | None:
        return out_slice.base_model or self.spec.base_model

    def _merge_sources(self, out_slice: SliceSpec) -> list[SourceSpec]:
        """The models whose tensors are the method's inputs, in config order. Task-vector methods
        take the base separately, so a base listed among the models is not an input."""
        base = self._base_name(out_slice)
        if base is not None and self.method.uses_base:
            return [s for s in out_slice.sources if s.model != base]
        return list(out_slice.sources)

    def _models_slice(self) -> SliceSpec:
        """A `models:` config as one slice. A base it does not list joins as the last source,
        with no parameters of its own, as mergekit 0.1.5 does; so methods that ignore the
        base (linear, karcher, ...) merge it as one more model (slices are taken as written)."""
        sources = list(self.spec.models or [])
        base = self.spec.base_model
        if base is not None and all(s.model != base for s in sources):
            sources.append(SourceSpec(model=base))
        return SliceSpec(sources=sources, base_model=None, parameters={})

    def _input_models(self, out_slice: SliceSpec) -> list[str]:
        return [s.model for s in self._merge_sources(out_slice)]

    def _plan_non_layer(self, names: list[str], out_slice: SliceSpec) -> None:
        for name in names:
            self._plan_tensor(name, out_slice, {s.model: name for s in out_slice.sources}, None, 0.0, name)

    def _plan_slice(self, out_slice: SliceSpec, layer_names: dict[int, list[str]], template_layers: int, out_offset: int) -> int:
        """Plan the slice's layers; returns the next free output layer index."""
        if self.spec.slices is None:
            ranges = {s.model: (0, template_layers) for s in out_slice.sources}
            length = template_layers
        else:
            ranges = {s.model: s.layer_range for s in out_slice.sources}
            length = out_slice.layer_count
        first_name = self._base_name(out_slice) or out_slice.sources[0].model
        for source in out_slice.sources:
            start, end = ranges[source.model]
            available = layer_count(self.checkpoints[self.index[source.model]])
            if end > available and self.spec.slices is None:
                raise PlanError(f"{source.model} has {available} layers but {first_name} has {end}; a `models:` merge "
                                "takes every layer of each model, so they must have as many (slices take ranges)")
            if end > available:
                raise PlanError(f"layer_range [{start}, {end}) of {source.model} exceeds its {available} layers")
        first = out_slice.sources[0]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            template_layer = ranges[first.model][0] + offset
            if template_layer not in layer_names and self.spec.slices is None:
                continue
            for template_name in self._names_of_layer(first.model, template_layer, layer_names):
                out_name = with_layer_index(template_name, out_offset + offset)
                sources = {s.model: with_layer_index(template_name, ranges[s.model][0] + offset) for s in out_slice.sources}
                self._plan_tensor(out_name, out_slice, sources, out_offset + offset, t, template_name)
        return out_offset + length

    def _names_of_layer(self, model: str, layer: int, template_layers: dict[int, list[str]]) -> list[str]:
        if self.spec.slices is None:
            return template_layers.get(layer, [])
        names = [n for n in self.checkpoints[self.index[model]].names if layer_index(n) == layer and not _is_recomputed_buffer(n)]
        if not names:
            raise PlanError(f"{model} has no tensors for layer {layer}")
        return names

    # -- one tensor ----------------------------------------------------------------------
    def _plan_tensor(self, out_name: str, out_slice: SliceSpec, source_names: dict[str, str], layer: int | None, t: float, shape_name: str) -> None:
        base_model = self._base_name(out_slice)
        merge_sources = self._merge_sources(out_slice)
        refs = [self._ref(s.model, source_names[s.model]) for s in merge_sources]
        base_ref = None
        if base_model is not None and self.method.uses_base:
            base_ref = self._ref(base_model, source_names.get(base_model, shape_name))
        if not refs and base_ref is None:
            raise ConfigError("the config has no models to merge")
        shape_from = base_ref or refs[0]
        info = self.checkpoints[shape_from.checkpoint].info(shape_from.name)
        all_refs = refs + ([base_ref] if base_ref else [])
        vocab = None
        if is_vocabulary_tensor(out_name):
            shape, vocab = self._vocabulary_shape(out_name, all_refs, base_ref is not None)
        else:
            self._check_same_shape(all_refs, shape_from)
            shape = tuple(info.shape)
        self._check_same_kind(all_refs, shape_from)
        copy_only = not info.dtype.is_floating_point
        out_dtype = info.dtype if copy_only else (self.spec.out_dtype or self.spec.dtype or merged_dtype(
            self.checkpoints[r.checkpoint].info(r.name).dtype for r in all_refs))
        params = [self._model_params(s, out_slice, out_name, t) for s in merge_sources]
        global_params = self._global_params(out_slice, out_name, t)
        self.tensors.append(
            PlannedTensor(out_name, shape, out_dtype, refs, base_ref, params, global_params, layer, copy_only, vocab)
        )
        self.input_bytes[out_name] = sum(self.checkpoints[r.checkpoint].read_bytes(r.name) for r in refs + ([base_ref] if base_ref else []))

    def _check_same_kind(self, refs: list[TensorRef], kind_from: TensorRef) -> None:
        """Floating-point in every model (merged, whatever the widths) or in none (an integer
        buffer, copied): a mix has no merge, and the kernels would stop mid-merge on it."""
        expected = self.checkpoints[kind_from.checkpoint].info(kind_from.name).dtype
        for ref in refs:
            other = self.checkpoints[ref.checkpoint].info(ref.name).dtype
            if other.is_floating_point != expected.is_floating_point:
                raise PlanError(
                    f"tensor {ref.name} is {str(other).removeprefix('torch.')} in {self.names[ref.checkpoint]} "
                    f"but {str(expected).removeprefix('torch.')} in {self.names[kind_from.checkpoint]}; floating-point "
                    "tensors merge and integer ones are copied, so every model must store it as one kind"
                )

    def _check_same_shape(self, refs: list[TensorRef], shape_from: TensorRef) -> None:
        expected = self.checkpoints[shape_from.checkpoint].info(shape_from.name).shape
        for ref in refs:
            other = self.checkpoints[ref.checkpoint].info(ref.name).shape
            if other != expected:
                raise PlanError(
                    f"tensor {ref.name} has shape {list(other)} in {self.names[ref.checkpoint]} "
                    f"but {list(expected)} in {self.names[shape_from.checkpoint]}"
                )

    def _vocabulary_shape(self, out_name: str, refs: list[TensorRef], has_base: bool) -> tuple[tuple[int, ...], VocabularyAlignment | None]:
        """Output shape of a token-indexed tensor, and how its inputs' rows map onto the output
        vocabulary (None when every input already is in output order)."""
        shapes = [tuple(self.checkpoints[r.checkpoint].info(r.name).shape) for r in refs]
        if any(shape[1:] != shapes[0][1:] for shape in shapes):
            listed = ", ".join(f"{self.names[r.checkpoint]}: {list(shape)}" for r, shape in zip(refs, shapes))
            raise PlanError(f"tensor {out_name} differs in more than its vocabulary rows ({listed}); only the vocabulary may differ")
        if self.vocabulary is None:
            if len({shape[0] for shape in shapes}) > 1:
                listed = ", ".join(f"{self.names[r.checkpoint]} has {shape[0]}" for r, shape in zip(refs, shapes))
                if self.truncate_embeddings:
                    return self._truncated(out_name, shapes, listed, len(refs) - has_base, has_base)
                raise PlanError(
                    f"tensor {out_name} has vocabularies of different sizes ({listed}); set "
                    "`tokenizer_source: base`, `union` or `model:<path>` to align the embedding rows "
                    "(or keep only the rows all have: --unsafe-truncate-embeddings)"
                )
            return shapes[0], None
        models = [self.names[r.checkpoint] for r in refs]
        for model, shape in zip(models, shapes):
            known = self.vocabulary.model_sizes[model]
            if shape[0] < known:
                raise PlanError(f"tensor {out_name} of {model} has {shape[0]} rows but its vocab_size is {known}")
        out_shape = (self.vocabulary.padded_size, *shapes[0][1:])
        rows = [self.vocabulary.rows[m] for m in models]
        overrides = self._row_overrides(out_name, models, shapes, rows)
        if not overrides and all(self.vocabulary.is_identity(m, shape[0]) for m, shape in zip(models, shapes)):
            return out_shape, None
        return out_shape, VocabularyAlignment(
            input_rows=tuple(rows[: len(rows) - has_base]), base_rows=rows[-1] if has_base else None,
            overrides=overrides, padded_size=self.vocabulary.padded_size,
        )

    def _truncated(self, out_name: str, shapes: list[tuple[int, ...]], listed: str, inputs: int,
                   has_base: bool) -> tuple[tuple[int, ...], VocabularyAlignment]:
        """mergekit's --unsafe-truncate-embeddings: keep the first rows, as many as every model
        has, assuming their token ids mean the same in all (nothing checks that).
        config.json's vocab_size becomes the kept count, so the output loads (mergekit leaves it)."""
        rows = min(shape[0] for shape in shapes)
        self.truncated_rows = min(rows, self.truncated_rows or rows)
        self.notes.append(f"{out_name}: truncated to the first {rows} rows, which every input has ({listed}); "
                          "--unsafe-truncate-embeddings assumes those token ids mean the same in every model")
        kept = torch.arange(rows)
        return (rows, *shapes[0][1:]), VocabularyAlignment(input_rows=(kept,) * inputs, base_rows=kept if has_base else None)

    def _row_overrides(self, out_name: str, models: list[str], shapes: list[tuple[int, ...]],
                       rows: list[torch.Tensor]) -> tuple[RowOverride, ...]:
        """The `tokenizer.tokens` entries that change this tensor: a forced token, or one some
        model of the group lacks (mergekit resolves a token's source only then)."""
        overrides = []
        for token, embedding in self.spec.tokens.items():
            where = f"tokenizer.tokens[{token!r}] (tensor {out_name})"
            row = self.vocabulary.token_ids.get(token)
            if row is None:  # added, but the tokenizer stores it under another form
                raise PlanError(f"{where}: the output tokenizer has no token {token!r} after adding it")
            if not embedding.force and all(r[row] >= 0 for r in rows):
                continue
            if embedding.kind == ZERO:
                overrides.append(RowOverride(row, embedding.force))
                continue
            if embedding.model not in models:
                raise PlanError(f"{where}: its source {embedding.model} is not one of this tensor's models ({', '.join(models)})")
            source = models.index(embedding.model)
            if embedding.kind == MODEL:
                source_row = int(rows[source][row])
                if source_row < 0:
                    raise PlanError(f"{where}: the source {embedding.model} does not have the token")
            elif embedding.token is not None:
                source_row = self.vocabulary.model_vocabs[embedding.model].get(embedding.token, -1)
                if source_row < 0:
                    raise PlanError(f"{where}: {embedding.token!r} is not in the tokenizer of {embedding.model}")
            else:
                source_row = embedding.token_id
            if source_row >= shapes[source][0]:
                raise PlanError(f"{where}: row {source_row} is beyond the {shapes[source][0]} rows of {embedding.model}")
            overrides.append(RowOverride(row, embedding.force, source, source_row))
        return tuple(overrides)

    def _ref(self, model: str, name: str) -> TensorRef:
        """`name` in `model`; a tied model's output embedding is its input embedding."""
        checkpoint = self.checkpoints[self.index[model]]
        if not checkpoint.has(name):
            tied = tied_source(name, checkpoint.names)
            if tied is None:
                raise PlanError(f"tensor {name} is missing from model {model}")
            name = tied
        return TensorRef(self.index[model], name)

    def _model_params(self, source: SourceSpec, out_slice: SliceSpec, tensor: str, t: float) -> dict[str, Any]:
        chain = [source.parameters, out_slice.parameters, self.spec.parameters]
        resolved = {}
        for name, default in (UNIVERSAL_MODEL_PARAMS | self.method.model_params).items():
            resolved[name] = _resolve(name, chain, tensor, t, default, f"model {source.model}")
        for name in self.method.required_model_params:
            # Required parameters are numbers (weight, density, ...): checked as such.
            value = _resolve(name, chain, tensor, t, REQUIRED, f"model {source.model}")
            if value is REQUIRED:
                raise ConfigError(
                    f"merge_method {self.spec.merge_method} needs parameter `{name}` for model {source.model} "
                    f"(tensor {tensor}); set it in the model's `parameters` or the top-level `parameters`"
                )
            resolved[name] = value
        return resolved

    def _global_params(self, out_slice: SliceSpec, tensor: str, t: float) -> dict[str, Any]:
        chain = [out_slice.parameters, self.spec.parameters]
        return {
            name: _resolve(name, chain, tensor, t, default, "the merge")
            for name, default in self.method.global_params.items()
        }

    def _in_file_order(self) -> list[PlannedTensor]:
        """Visit tensors in the order their first input lies on disk (sequential reads)."""
        def key(tensor: PlannedTensor) -> tuple[int, str, int]:
            ref = tensor.base or tensor.inputs[0]
            info = self.checkpoints[ref.checkpoint].info(ref.name)
            return ref.checkpoint, str(info.path), info.begin
        return sorted(self.tensors, key=key)

    def _output_config(self, source: Checkpoint, out_layers: int | None, in_layers: int) -> dict[str, Any] | None:
        if source.config is None:
            return None
        config = dict(source.config)
        if out_layers is not None and out_layers != in_layers and "num_hidden_layers" in config:
            config["num_hidden_layers"] = out_layers
        if self.vocabulary is not None:
            config["vocab_size"] = self.vocabulary.padded_size
        elif self.truncated_rows is not None:
            config["vocab_size"] = self.truncated_rows
        if config.get("tie_word_embeddings", True) and any(is_output_embedding(t.name) and not source.has(t.name) for t in self.tensors):
            # The config's model is tied but another input is not, so the output has a merged
            # lm_head of its own; left tied, transformers would drop it and reuse the embedding.
            # (mergekit keeps the flag and so loses that lm_head: a deliberate difference.)
            config["tie_word_embeddings"] = False
        return config

    def _chat_template(self, donor: Checkpoint) -> str | None:
        if self.spec.chat_template is None:
            return None
        directories = [c.directory for c in self.checkpoints if c.directory is not None]
        template = resolve_chat_template(self.spec.chat_template, directories)
        if template is not None and self.vocabulary is None and not (donor.directory and (donor.directory / "tokenizer_config.json").is_file()):
            raise ConfigError(
                f"`chat_template` is set but {donor.path} has no tokenizer_config.json to write it into; "
                "set `tokenizer_source` or add the tokenizer files to that model"
            )
        return template


class Required(float):
    """Default of a required parameter: numeric (so values are checked as numbers) and a unique
    object (so `is` tells that no level of the config set it)."""


REQUIRED = Required(0.0)


def _resolve(name: str, chain: Iterable[dict[str, Any]], tensor: str, t: float, default: Any, owner: str) -> Any:
    """First setting in precedence order that yields a value for this tensor, else the default."""
    for params in chain:
        if name in params:
            value = evaluate_setting(params[name], tensor, t)
            if value is not None:
                return check_parameter_value(name, value, default, owner, tensor)
    return default


def check_parameter_value(name: str, value: Any, default: Any, owner: str, tensor: str) -> Any:
    numeric_default = is_number(default)
    if numeric_default or default is None:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                if numeric_default:
                    raise ConfigError(f"parameter `{name}` of {owner} must be a number, got {value!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"parameter `{name}` of {owner} is {value} for tensor {tensor}; it must be finite")
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"parameter `{name}` of {owner} must be true or false, got {value!r}")
    return value
