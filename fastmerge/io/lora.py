"""LoRA references (`model+adapter`, as in mergekit configs): a model with a PEFT LoRA adapter
applied, read tensor by tensor.

mergekit merges such an adapter into a full copy of the model (peft's `merge_and_unload`, the
model loaded whole) and saves it to a cache before merging. fastmerge applies the adapter to
each tensor as the merge reads it, so memory stays bounded by the largest tensor and nothing is
written besides the output. The arithmetic is peft's: a target W (out x in) becomes

    W + s * B @ A                       s = alpha / r   (alpha / sqrt(r) with use_rslora)

with A (r x in) and B (out x r) from the adapter, the product transposed for `fan_in_fan_out`
layers and for embeddings (whose A is r x vocab). It is formed in fp32 and added to W in fp32,
then rounded once to W's stored dtype, which is what peft's `merge_and_unload` does to a bf16
model with an fp32 adapter; for embeddings peft rounds the product to W's dtype before adding,
and so does fastmerge, so the bytes are peft's. DoRA (`use_dora`) rescales each output of
W + s B A to the adapter's magnitude m: m_o / ||(W + s B A)_o|| * (W + s B A)_o, where output o
is a row of a linear layer and a stored column of a fan_in_fan_out layer or an embedding (the
product not rounded first there, as in peft). A bias trained with `lora_bias` adds s * B's bias
to the layer's bias. A convolution's LoRA (A a convolution of the layer's kernel into r
channels, B a 1 x 1 one back to the outputs) adds s * B A as peft forms it: a matrix product for
1 x 1 kernels, else the convolution of A's transpose with B, so the bytes are peft's again;
with DoRA each output channel is rescaled over all its inputs and kernel taps.
Tensors the adapter stores whole (`modules_to_save`, embeddings saved with their base layer)
replace the model's.

Every adapter tensor is matched to a model tensor when the reference is opened, and anything
fastmerge cannot apply exactly (other PEFT methods, LoRA variants other than DoRA, shapes that
do not fit, grouped convolutions among them) is a CheckpointError naming it, before the merge
starts.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..values import is_finite_number
from .checkpoint import Checkpoint
from .pickle_file import PickleFile
from .safetensors_file import SafetensorsFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
# PEFT names a LoRA model's tensors after the wrapped model's modules, under this prefix.
KEY_PREFIX = "base_model.model."
# Adapter options that change what merging computes and that fastmerge does not implement.
UNSUPPORTED_OPTIONS = (
    "alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication", "monteclora_config",
    "target_parameters", "trainable_token_indices", "use_bdlora", "use_qalora", "velora_config",
)
# Stored rows formed in fp32 at a time (an 11008 x 4096 fp32 delta would be 180 MB; 512 rows
# of 11008 columns are 22 MB).
APPLY_ROWS = 512

_LOW_RANK_PARTS = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.bias": "up_bias",
    ".lora_embedding_A": "down",
    ".lora_embedding_B": "up",
    ".lora_magnitude_vector": "magnitude",
}
_BASE_LAYER = ".base_layer."


def split_reference(reference: str) -> tuple[str, str | None]:
    """(model, adapter) of a model reference: a path that exists is a model even if its name has
    a '+'; otherwise 'model+adapter' names a LoRA adapter, as mergekit reads it."""
    if "+" not in reference or Path(reference).expanduser().exists():
        return reference, None
    parts = reference.split("+")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"`{reference}`: a LoRA reference is MODEL+ADAPTER (one '+', both paths non-empty)")
    return parts[0], parts[1]


def open_model(reference: str, allow_pickle: bool = False) -> Checkpoint:
    """The checkpoint a config's model reference names, with its LoRA adapter applied if any."""
    model, adapter = split_reference(reference)
    if adapter is None:
        return Checkpoint(Path(model).expanduser(), allow_pickle=allow_pickle)
    return AdaptedCheckpoint(model, adapter, allow_pickle=allow_pickle)


@dataclass
class LowRankUpdate:
    """The adapter tensors (names in the adapter file) that update one model matrix."""

    module: str
    down: str | None = None
    up: str | None = None
    up_bias: str | None = None
    magnitude: str | None = None
    scaling: float = 1.0
    # The product B @ A is (out x in); fan_in_fan_out layers and embeddings store its transpose.
    transposed: bool = False
    embedding: bool = False
    # A convolution's update: A is (r, in, *kernel), B is (out, r, 1, ...).
    conv: bool = False


class LoraAdapter:
    """A PEFT LoRA adapter directory: its config and its tensors (read lazily)."""

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise CheckpointError(f"{path}: no such LoRA adapter directory")
        self.config = self._read_config()
        self.options = _AdapterOptions(self.config, self.path / ADAPTER_CONFIG)
        self.file = self._open_weights(allow_pickle)  # last: nothing stays open if a check fails

    def _read_config(self) -> dict[str, Any]:
        config_path = self.path / ADAPTER_CONFIG
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: not a PEFT adapter (no {ADAPTER_CONFIG})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{config_path}: cannot read the adapter config ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: the adapter config must be a JSON object")
        if config.get("peft_type") != "LORA":
            raise CheckpointError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters (LORA) can be applied")
        for option in UNSUPPORTED_OPTIONS:
            if config.get(option):
                raise CheckpointError(f"{config_path}: `{option}` is set; fastmerge applies plain LoRA and DoRA adapters only")
        if isinstance(config.get("init_lora_weights"), str) and config["init_lora_weights"].lower() == "mica":
            raise CheckpointError(f"{config_path}: the MiCA variant (init_lora_weights: mica) cannot be applied")
        return config

    def _open_weights(self, allow_pickle: bool) -> SafetensorsFile | PickleFile:
        safetensors_path, pickle_path = self.path / ADAPTER_SAFETENSORS, self.path / ADAPTER_PICKLE
        if safetensors_path.is_file():
            return SafetensorsFile(safetensors_path)
        if pickle_path.is_file():
            if not allow_pickle:
                raise CheckpointError(f"{self.path}: the adapter is a pickle ({ADAPTER_PICKLE}), which can run code when "
                                      "loaded; pass --allow-pickle (allow_pickle=True) if you trust it")
            return PickleFile(pickle_path)
        raise CheckpointError(f"{self.path}: no adapter weights ({ADAPTER_SAFETENSORS} or {ADAPTER_PICKLE})")

    def tensor(self, key: str) -> torch.Tensor:
        return self.file.tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.file.infos[key].shape)

    def nbytes(self, key: str) -> int:
        return self.file.infos[key].nbytes

    def plan(self) -> tuple[dict[str, LowRankUpdate], dict[str, str]]:
        """Low-rank updates keyed by the model tensor they change, and whole-tensor replacements
        (model tensor -> adapter key)."""
        updates: dict[str, LowRankUpdate] = {}
        replacements: dict[str, str] = {}
        for key in self.file.infos:
            if not key.startswith(KEY_PREFIX):
                raise CheckpointError(f"{self.file.path}: tensor {key!r} is not named as PEFT names a model's tensors ({KEY_PREFIX}...)")
            name = key[len(KEY_PREFIX):]
            part = next((p for p in _LOW_RANK_PARTS if name.endswith(p)), None)
            if part is not None:
                module = name[: -len(part)]
                update = updates.setdefault(module + ".weight", LowRankUpdate(module))
                setattr(update, _LOW_RANK_PARTS[part], key)
                update.embedding = update.embedding or "embedding" in part
                update.transposed = update.embedding or self.options.fan_in_fan_out
            elif _BASE_LAYER in name:
                replacements[name.replace(_BASE_LAYER, ".")] = key
            elif "lora_" in name or "modules_to_save" in name or "token_adapter" in name:
                raise CheckpointError(f"{self.file.path}: tensor {key!r} is not part of a LoRA update fastmerge can apply")
            else:
                replacements[name] = key
        for update in updates.values():
            self._complete(update)
        return updates, replacements

    def _complete(self, update: LowRankUpdate) -> None:
        """Check that A and B are both there and agree on the rank, and set the scaling."""
        where = f"{self.file.path}: module {update.module!r}"
        if update.down is None or update.up is None:
            raise CheckpointError(f"{where} has only one of lora_A / lora_B")
        down, up = self.shape(update.down), self.shape(update.up)
        update.conv = len(down) > 2
        if len(down) != len(up) or len(down) > 5 or (update.conv and (update.embedding or any(k != 1 for k in up[2:]))):
            raise CheckpointError(f"{where}: lora_A {list(down)} and lora_B {list(up)} are neither matrices nor a "
                                  "convolution's LoRA (A over the kernel, B 1 x 1)")
        rank = down[0]
        if up[1] != rank:
            raise CheckpointError(f"{where}: lora_A has {rank} rows but lora_B has {up[1]} columns")
        expected = self.options.rank(update.module)
        if rank != expected:
            raise CheckpointError(f"{where}: lora_A has rank {rank} where the adapter config gives {expected}")
        # peft would not refuse either mismatch: it ignores a magnitude use_dora does not ask for,
        # and keeps the base weight's norms where a DoRA module's magnitude is missing.
        if self.options.dora and update.magnitude is None:
            raise CheckpointError(f"{where}: the adapter config sets use_dora but the module has no lora_magnitude_vector")
        if not self.options.dora and update.magnitude is not None:
            raise CheckpointError(f"{where}: has a lora_magnitude_vector but the adapter config does not set use_dora")
        update.scaling = self.options.scaling(update.module, rank)

    def close(self) -> None:
        self.file.close()


class _AdapterOptions:
    """The adapter config's numbers, checked, and peft's per-module rank and alpha lookup."""

    def __init__(self, config: dict[str, Any], where: Path):
        self.r = _positive(config.get("r"), "r", where, integer=True)
        self.alpha = _positive(config.get("lora_alpha", self.r), "lora_alpha", where)
        self.rank_pattern = _pattern(config.get("rank_pattern"), "rank_pattern", where, integer=True)
        self.alpha_pattern = _pattern(config.get("alpha_pattern"), "alpha_pattern", where)
        self.rslora = bool(config.get("use_rslora", False))
        self.dora = bool(config.get("use_dora", False))
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    def rank(self, module: str) -> int:
        return _lookup(self.rank_pattern, module, self.r)

    def scaling(self, module: str, rank: int) -> float:
        alpha = _lookup(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def _lookup(patterns: dict[str, float], module: str, default: float) -> Any:
    """peft's rule: the first pattern that matches the end of the module name, at a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _positive(value: Any, name: str, where: Path, integer: bool = False) -> Any:
    valid = is_finite_number(value) and value > 0
    if not valid or (integer and not float(value).is_integer()):
        raise CheckpointError(f"{where}: `{name}` must be a positive {'integer' if integer else 'number'}, got {value!r}")
    return int(value) if integer else value


def _pattern(value: Any, name: str, where: Path, integer: bool = False) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: `{name}` must be an object of module pattern -> value")
    return {str(k): _positive(v, f"{name}.{k}", where, integer) for k, v in value.items()}


def apply_low_rank(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scaling: float,
                   transposed: bool = False, magnitude: torch.Tensor | None = None,
                   round_delta: bool = False) -> torch.Tensor:
    """weight + scaling * up @ down (transposed when `transposed`), in fp32, rounded once to
    weight's dtype; with `magnitude`, each row rescaled to it (DoRA). `round_delta` rounds the
    product to weight's dtype before the sum, as peft does for embeddings. Formed APPLY_ROWS
    stored rows at a time, so the fp32 intermediates stay small."""
    if transposed:
        left, right = down.float().T, up.float().T
    else:
        left, right = up.float(), down.float()
    if magnitude is not None and transposed:
        return _dora_by_columns(weight, left @ right, scaling, magnitude)
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    # One fp32 block reused: fresh 20-40 MB temporaries per block cost page faults, 3-4x the time.
    block = torch.empty(min(APPLY_ROWS, weight.shape[0]), weight.shape[1], dtype=torch.float32)
    for start in range(0, weight.shape[0], APPLY_ROWS):
        rows = slice(start, start + APPLY_ROWS)
        combined = block[: min(APPLY_ROWS, weight.shape[0] - start)]
        torch.matmul(left[rows], right, out=combined).mul_(scaling)
        if round_delta:
            combined.copy_(combined.to(weight.dtype))
        combined.add_(weight[rows])  # weight's values widen exactly to fp32
        if magnitude is not None:
            combined.mul_((magnitude[rows].float() / torch.linalg.vector_norm(combined, dim=1)).unsqueeze(1))
        out[rows].copy_(combined)
    return out


def apply_conv_low_rank(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scaling: float,
                        magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """A convolution's weight + scaling * its LoRA product, formed in fp32 as peft forms it (a
    matrix product for 1 x 1 kernels, else the convolution of A's transpose with B), added to
    the weight in fp32 and rounded once to its dtype; with `magnitude` (DoRA), each output
    channel first rescaled to it over the norm of all its inputs and kernel taps. Convolution
    weights are small, so the whole product is formed at once."""
    a, b = down.float(), up.float()
    if all(k == 1 for k in weight.shape[2:]):
        product = (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)
    else:
        conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[a.dim()]
        product = conv(a.transpose(0, 1), b).transpose(0, 1)
    delta = product * scaling
    if magnitude is None:
        return delta.add_(weight.float()).to(weight.dtype)
    # The norm's sum runs in the memory order of `weight + delta`, written as peft writes it
    # (delta is a transposed view for kernels above 1 x 1); another order can move its last bit.
    combined = weight + delta
    norm = combined.norm(p=2, dim=tuple(range(1, combined.dim())), keepdim=True)
    return ((magnitude.float().reshape(norm.shape) / norm) * combined).to(weight.dtype)


def _dora_by_columns(weight: torch.Tensor, product: torch.Tensor, scaling: float, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA on a layer stored transposed (fan_in_fan_out, embeddings): the magnitude rescales
    each stored column, whose norm runs over every row, so the whole fp32 matrix is formed
    (twice the tensor's bytes and more; only here)."""
    combined = product.mul_(scaling).add_(weight)
    return combined.mul_(magnitude.float() / torch.linalg.vector_norm(combined, dim=0)).to(weight.dtype)


class AdaptedCheckpoint(Checkpoint):
    """A model with a LoRA adapter applied: the model's tensors, the adapted ones computed when
    read (a new tensor each time, on the caller's thread)."""

    def __init__(self, model: str | Path, adapter: str | Path, allow_pickle: bool = False):
        super().__init__(model, allow_pickle=allow_pickle)
        try:
            self.adapter = LoraAdapter(adapter, allow_pickle=allow_pickle)
        except BaseException:
            super().close()
            raise
        try:
            self.updates, self.replacements = self.adapter.plan()
            self._check_targets()
        except BaseException:
            self.close()
            raise

    def _check_targets(self) -> None:
        """Every adapter tensor must fit a model tensor, checked on opening so a merge never
        fails half-way on a bad adapter."""
        where = f"{self.adapter.path} (applied to {self.path})"
        for target, key in self.replacements.items():
            self._require(target, where, key)
            if self.adapter.shape(key) != tuple(self.info(target).shape):
                raise CheckpointError(f"{where}: {key!r} has shape {list(self.adapter.shape(key))} but the model's "
                                      f"{target!r} has {list(self.info(target).shape)} (resized vocabularies cannot be applied)")
        for target, update in self.updates.items():
            self._check_update(target, update, where)

    def _check_update(self, target: str, update: LowRankUpdate, where: str) -> None:
        self._require(target, where, update.down)
        info = self.info(target)
        product = (self.adapter.shape(update.up)[0], *self.adapter.shape(update.down)[1:])  # B @ A: out x in (x kernel)
        stored = product[::-1] if update.transposed and not update.conv else product
        if tuple(info.shape) != stored:
            raise CheckpointError(f"{where}: module {update.module!r}: B @ A is {' x '.join(map(str, product))}, which "
                                  f"does not fit {target!r} of shape {list(info.shape)}")
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{where}: {target!r} is {info.dtype}, not a float tensor a LoRA can update")
        magnitude = self.adapter.shape(update.magnitude) if update.magnitude is not None else None
        # a convolution's magnitude is stored (1, out, 1, ...)
        if magnitude is not None and (magnitude != product[:1] if not update.conv else math.prod(magnitude) != product[0]):
            # one magnitude per output: a row of B @ A (an embedding's output is its width, B's rows too)
            raise CheckpointError(f"{where}: module {update.module!r}: the DoRA magnitude has shape "
                                  f"{list(magnitude)}, expected [{product[0]}]")
        if update.up_bias is not None:
            bias = update.module + ".bias"
            self._require(bias, where, update.up_bias)
            if tuple(self.info(bias).shape) != product[:1] or self.adapter.shape(update.up_bias) != product[:1]:
                raise CheckpointError(f"{where}: module {update.module!r}: the LoRA bias does not fit {bias!r}")

    def _require(self, target: str, where: str, key: str | None) -> None:
        if not self.has(target):
            raise CheckpointError(f"{where}: adapter tensor {key!r} applies to {target!r}, which the model does not have")

    def tensor(self, name: str) -> torch.Tensor:
        """The adapted tensor: the model's, or the adapter's stored copy, plus the LoRA update."""
        dtype = self.info(name).dtype
        base = self.adapter.tensor(self.replacements[name]).to(dtype) if name in self.replacements else super().tensor(name)
        update = self.updates.get(name)
        if update is not None:
            magnitude = self.adapter.tensor(update.magnitude) if update.magnitude else None
            if update.conv:
                return apply_conv_low_rank(base, self.adapter.tensor(update.down), self.adapter.tensor(update.up),
                                           update.scaling, magnitude)
            # peft rounds an embedding's product first, except under DoRA
            return apply_low_rank(base, self.adapter.tensor(update.down), self.adapter.tensor(update.up), update.scaling,
                                  update.transposed, magnitude, round_delta=update.embedding and magnitude is None)
        bias_update = self._bias_update(name)
        if bias_update is not None:
            # peft adds s * B's bias to the layer's bias in fp32 and rounds once, like the weight.
            return (self.adapter.tensor(bias_update.up_bias).float() * bias_update.scaling).add_(base.float()).to(dtype)
        return base

    def adapts(self, name: str) -> bool:
        """Whether the adapter changes tensor `name` (updates it or replaces it)."""
        return name in self.updates or name in self.replacements or self._bias_update(name) is not None

    def read_bytes(self, name: str) -> int:
        """The model's tensor or the adapter's stored copy, and the adapter tensors that update it."""
        stored = self.replacements.get(name)
        read = self.adapter.nbytes(stored) if stored else super().read_bytes(name)
        update, bias_update = self.updates.get(name), self._bias_update(name)
        if update is not None:
            read += sum(self.adapter.nbytes(key) for key in (update.down, update.up, update.magnitude) if key)
        elif bias_update is not None:
            read += self.adapter.nbytes(bias_update.up_bias)
        return read

    def _bias_update(self, name: str) -> LowRankUpdate | None:
        if not name.endswith(".bias"):
            return None
        update = self.updates.get(name[: -len(".bias")] + ".weight")
        return update if update is not None and update.up_bias is not None else None

    @property
    def sources(self) -> list[Path]:
        return [self.path, self.adapter.path]

    def prefetch(self, name: str) -> None:
        """Read ahead what `tensor` will read: not the model's copy of a tensor the adapter replaces."""
        if name not in self.replacements:
            super().prefetch(name)

    def close(self) -> None:
        super().close()
        self.adapter.close()

    def summary(self) -> str:
        """One line for `fastmerge plan`: what the adapter changes in which model."""
        stored = f", {len(self.replacements)} stored whole" if self.replacements else ""
        return f"{self.adapter.path} on {self.path}: {len(self.updates)} tensors updated{stored}"

    def __repr__(self) -> str:
        return f"AdaptedCheckpoint({str(self.path)!r} + LoRA {str(self.adapter.path)!r}, {len(self.updates)} updates)"

