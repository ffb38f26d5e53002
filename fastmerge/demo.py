"""Built-in example checkpoints and the `fastmerge demo` command.

The examples are Llama-shaped (the tensor names and shapes of a real LlamaForCausalLM, so
transformers can load them), deterministic by seed, a few MB, and sharded like Hugging Face
checkpoints. Fine-tunes are the base plus a seeded task vector, so a merge has something real
to do. Tests and benchmarks build their checkpoints with the same functions.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import OutputError
from .io.writer import ShardedWriter


@dataclass(frozen=True)
class LlamaShape:
    """The size of a Llama-architecture model."""

    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of LlamaForCausalLM in Hugging Face naming, embeddings first."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        shapes = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            shapes += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        shapes.append(("model.norm.weight", (h,)))
        if not self.tie_word_embeddings:
            shapes.append(("lm_head.weight", (self.vocab_size, h)))
        return shapes

    def param_count(self) -> int:
        return sum(math.prod(dims) for _, dims in self.tensor_shapes())

    def hf_config(self, dtype: torch.dtype) -> dict:
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        config.update(asdict(self))
        return config


def make_state(shape: LlamaShape, seed: int) -> dict[str, torch.Tensor]:
    """A deterministic fp32 'pre-trained' state: scaled Gaussian matrices, unit norms."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, dims in shape.tensor_shapes():
        if len(dims) == 1:
            state[name] = torch.ones(dims)
        else:
            state[name] = torch.randn(dims, generator=generator) / math.sqrt(dims[-1])
    return state


def fine_tune_of(base: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """The base plus a seeded task vector (relative size `scale`), like a short fine-tune."""
    generator = torch.Generator().manual_seed(seed)
    return {name: t + scale * t.abs().mean() * torch.randn(t.shape, generator=generator) for name, t in base.items()}


def write_checkpoint(
    directory: Path,
    state: dict[str, torch.Tensor],
    shape: LlamaShape | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 1_000_000,
    tokenizer: bool = True,
) -> Path:
    """Write `state` as a Hugging Face model directory (sharded safetensors + index, config.json,
    generation_config.json and a small word-level tokenizer when `shape` is given)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to(dtype).contiguous() for name, t in state.items()}
    writer = ShardedWriter(directory, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], max_shard_bytes)
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.finalize()
    finally:
        writer.close()
    if shape is not None:
        (directory / "config.json").write_text(json.dumps(shape.hf_config(dtype), indent=2) + "\n")
        (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        if tokenizer:
            _write_tokenizer(directory, shape.vocab_size)
    return directory


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A valid word-level tokenizer.json (specials, printable ASCII, filler words)."""
    words = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(33, 127)]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i, w in enumerate(words[:3])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words[:vocab_size])}, "unk_token": "<unk>"},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}) + "\n"
    )


DEMO_TASKS = ("math", "code", "chat")

DEMO_CONFIG = """\
# A task-arithmetic merge of three fine-tunes of one base model, as in mergekit's examples:
# per-layer weight gradients and a filter that treats the MLP differently.
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {math}
    parameters:
      weight: [0.6, 0.4]          # 0.6 at the first layer, 0.4 at the last
  - model: {code}
    parameters:
      weight:
        - filter: mlp
          value: 0.5
        - value: 0.3
  - model: {chat}
    parameters:
      weight: 0.3
parameters:
  lambda: 1.0
dtype: bfloat16
"""


def write_demo_models(directory: Path, shape: LlamaShape = LlamaShape(), seed: int = 0) -> dict[str, Path]:
    """Base + one fine-tune per demo task under directory/models; returns their paths."""
    base_state = make_state(shape, seed)
    paths = {"base": write_checkpoint(directory / "models" / "base", base_state, shape)}
    for offset, task in enumerate(DEMO_TASKS, start=1):
        paths[task] = write_checkpoint(directory / "models" / f"ft-{task}", fine_tune_of(base_state, seed + offset), shape)
    return paths


# Left in a directory the demo made, so a later run may replace its merge.yml and merged/.
DEMO_MARKER = ".fastmerge-demo"


def _claim_demo_directory(directory: Path) -> None:
    """The demo writes models/, merge.yml and merged/ (and replaces them when run again), so it
    takes only a new or empty directory, or one an earlier demo made: pointed at a directory
    of the user's own, it would overwrite their files."""
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory} is a file; give the demo a new or empty directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / DEMO_MARKER).exists():
        raise OutputError(f"{directory} is not empty and no earlier `fastmerge demo` made it; the demo writes "
                          "models/, merge.yml and merged/ there, so give it a new or empty directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / DEMO_MARKER).touch()
    except OSError as exc:
        raise OutputError(f"{directory}: cannot create the demo directory ({exc})") from None


def run_demo(directory: Path, quiet: bool = False) -> Path:
    """Build the example models (once) and merge them with the example config."""
    from .engine import run

    directory = directory.resolve()
    _claim_demo_directory(directory)
    models = directory / "models"
    paths = {name: models / ("base" if name == "base" else f"ft-{name}") for name in ("base", *DEMO_TASKS)}
    if not all((p / "model.safetensors.index.json").exists() for p in paths.values()):
        print(f"writing example checkpoints to {models} ...")
        paths = write_demo_models(directory)
    config_path = directory / "merge.yml"
    config_path.write_text(DEMO_CONFIG.format(**{k: str(v) for k, v in paths.items()}))
    print(f"config: {config_path}")
    report = run(config_path, directory / "merged", overwrite=True, quiet=quiet)
    print(report)
    return report.output_dir
