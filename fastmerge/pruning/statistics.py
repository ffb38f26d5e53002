"""The statistics pass: diagonal Fisher and mean gradient of the targeted weights on a data set.

For each batch b the objective's mean loss gives a gradient g_b; over B batches
    fisher = (1/B) sum_b g_b^2        mean_grad = (1/B) sum_b g_b
accumulated in fp32 whatever the model's dtype (squared bf16/fp16 gradients underflow).

Only targeted weights get `requires_grad`, and each has a post-accumulate-grad hook that folds
the fresh gradient into its two fp32 accumulators and frees it at once, so at most a few
parameter gradients exist at any time. Device memory for one pass is therefore the model, the
activations of one batch, and 8 bytes per targeted parameter; when a pass ends its
accumulators are written tensor by tensor to a safetensors directory and freed, and scoring
reads them back memory-mapped (docs: fastmerge/pruning/README.md, "Memory plan").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError, FastmergeError
from ..io.checkpoint import Checkpoint
from ..io.lora import AdaptedCheckpoint
from ..io.writer import ShardedWriter
from ..representations.models import require_transformers
from .config import PruneConfig
from .data import batched, load_pairs, load_texts
from .objectives import causal_lm_loss, contrastive_loss
from .targets import select_targets

FISHER_SUFFIX = ".fisher"
GRAD_SUFFIX = ".grad"
STATS_SHARD_BYTES = 2 * 1024**3


@dataclass
class LoadedModel:
    """A model for the statistics pass and the map from its parameter names to checkpoint names."""

    model: Any
    tokenizer: Any
    targets: dict[str, str]  # checkpoint tensor name -> model parameter name


def load_model(cfg: PruneConfig, checkpoint: Checkpoint, device: torch.device) -> LoadedModel:
    """The model and tokenizer in `cfg.model` (its LoRA adapter applied, if any), with only the
    targeted weights trainable."""
    transformers = require_transformers("the GAPrune statistics pass")
    auto = transformers.AutoModelForCausalLM if cfg.objective == "causal_lm" else transformers.AutoModel
    dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    try:
        model = auto.from_pretrained(str(cfg.model), dtype=dtype).to(device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(cfg.model))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"transformers cannot load {cfg.model} for {cfg.objective}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    model.eval()  # no dropout: the statistics describe the deployed function
    params = dict(model.named_parameters())
    names = {checkpoint_name(n, checkpoint, model.base_model_prefix): n for n in params}
    if isinstance(checkpoint, AdaptedCheckpoint):
        # transformers loaded the base model: the adapted tensors replace what the adapter changes
        with torch.no_grad():
            for ck, name in names.items():
                if ck is not None and checkpoint.adapts(ck):
                    params[name].copy_(checkpoint.tensor(ck))
    shapes = {ck: tuple(params[n].shape) for ck, n in names.items() if ck is not None}
    targets = {ck: names[ck] for ck in select_targets(shapes, cfg.targets, cfg.reference)}
    for name, param in params.items():
        param.requires_grad_(name in targets.values())
    return LoadedModel(model, tokenizer, targets)


def checkpoint_name(param: str, checkpoint: Checkpoint, prefix: str) -> str | None:
    """The checkpoint's name for model parameter `param` (with or without the base-model prefix)."""
    candidates = [param, param.removeprefix(prefix + "."), f"{prefix}.{param}"]
    return next((c for c in candidates if checkpoint.has(c)), None)


def _loss_fn(cfg: PruneConfig, loaded: LoadedModel, device: torch.device) -> tuple[Callable[[list], Any], Callable[[Path], list]]:
    if cfg.objective == "causal_lm":
        return (lambda batch: causal_lm_loss(loaded.model, loaded.tokenizer, batch, cfg.max_length, device)), load_texts
    return (
        lambda batch: contrastive_loss(loaded.model, loaded.tokenizer, batch, cfg.max_length, device, cfg.pooling, cfg.temperature),
        load_pairs,
    )


def gradient_statistics(cfg: PruneConfig, loaded: LoadedModel, data: Path, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{checkpoint name: (fisher, mean_grad)} of the targeted weights over `data`, fp32 on `device`."""
    loss_of, load = _loss_fn(cfg, loaded, device)
    examples = load(data)
    params = dict(loaded.model.named_parameters())
    accumulators: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for ck_name, param_name in loaded.targets.items():
        param = params[param_name]
        fisher = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        grad_sum = torch.zeros_like(fisher)
        accumulators[ck_name] = (fisher, grad_sum)

        def fold(p: torch.Tensor, fisher=fisher, grad_sum=grad_sum) -> None:
            g = p.grad.float()
            fisher.addcmul_(g, g)
            grad_sum.add_(g)
            p.grad = None

        handles.append(param.register_post_accumulate_grad_hook(fold))
    used = 0
    try:
        for batch in batched(examples, cfg.batch_size, cfg.num_batches):
            loss = loss_of(batch)
            if loss is None:
                continue
            loss.backward()
            used += 1
    finally:
        for handle in handles:
            handle.remove()
    if used == 0:
        raise FastmergeError(
            f"no batch of {data} has anything to learn from ({cfg.objective}: every text is padding or a "
            "single token, or a contrastive batch has a single candidate); add longer examples or raise batch_size"
        )
    if not any(bool(f.any()) for f, _ in accumulators.values()):
        raise FastmergeError(f"every gradient of the targeted weights is zero on {data}; the data gives no signal to prune by")
    for fisher, grad_sum in accumulators.values():
        fisher.div_(used)
        grad_sum.div_(used)
    return accumulators


def save_statistics(stats: dict[str, tuple[torch.Tensor, torch.Tensor]], directory: Path, data: Path) -> Checkpoint:
    """Write a pass's accumulators (fp32, `<name>.fisher` / `<name>.grad`) and free them; the
    returned Checkpoint reads them back memory-mapped."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, (fisher, _) in stats.items():
        specs += [(name + FISHER_SUFFIX, torch.float32, tuple(fisher.shape)), (name + GRAD_SUFFIX, torch.float32, tuple(fisher.shape))]
    with ShardedWriter(directory, specs, STATS_SHARD_BYTES, metadata={"fastmerge": "gradient statistics", "data": str(data)}) as writer:
        for name in list(stats):
            fisher, grad = stats.pop(name)
            writer.write(name + FISHER_SUFFIX, fisher.cpu())
            writer.write(name + GRAD_SUFFIX, grad.cpu())
            del fisher, grad
        writer.finalize()
    return Checkpoint(directory)


def collect_statistics(cfg: PruneConfig, checkpoint: Checkpoint, work_dir: Path, device: torch.device) -> tuple[list[str], dict[str, Checkpoint]]:
    """Run the passes the score needs (domain; general too for gaprune), saving each under
    `work_dir/<set>`; returns the targeted names and {set: statistics checkpoint}."""
    loaded = load_model(cfg, checkpoint, device)
    sets = {"domain": cfg.domain_data}
    if cfg.score == "gaprune":
        sets["general"] = cfg.general_data
    saved = {}
    for set_name, path in sets.items():
        stats = gradient_statistics(cfg, loaded, path, device)
        saved[set_name] = save_statistics(stats, work_dir / set_name, path)
    targets = list(loaded.targets)
    del loaded
    return targets, saved
