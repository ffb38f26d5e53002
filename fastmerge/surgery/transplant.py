"""Give a model another model's tokenizer (`fastmerge tokensurgeon`, mergekit-tokensurgeon 0.1.5).

The output is the model with its token-indexed tensors rebuilt for the donor's vocabulary: one
row per donor token id, copied from the model where it has the token (matching.py) and
approximated otherwise (approximate.py; mp_rope also reads num_attention_heads and rope_theta
from both config.json files, rope.py). That is the input embedding, the output embedding
(lm_head) when the model has one of its own (a model with tied embeddings keeps them tied), and
any output bias (its rows are copied for exact matches and zero for the rest). With --magikarp
the tokens either model never really trained are left out first (magikarp.py). Every other
tensor is copied unchanged. config.json is the model's with `vocab_size` set to the new row
count and the donor's pad/bos/eos token ids (as transformers reads the donor's config, so a
config class's defaults count, as in mergekit); the tokenizer files are the donor's.

A donor without an lm_head of its own (tied embeddings) lends its input embedding to
approximate the model's lm_head. The donor's hidden size may differ from the model's: the
donor's rows are only used to choose and weigh shared tokens.

Memory: one token-indexed tensor is rebuilt at a time (the model's and the donor's matrix, read
through their memory maps, and the new one), then every other tensor is streamed through the
sharded writer, so peak memory is a small multiple of the embedding, not the model. The output
is written into a staged directory renamed into place at the end, so a failed run leaves nothing
that looks like a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..engine import DEFAULT_SHARD_SIZE, peak_rss_bytes, reset_peak_rss, resolve_device
from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import Checkpoint
from ..io.output_dir import OutputReport, StagedOutput, write_model_config
from ..io.writer import ShardedWriter
from ..representations.models import open_tokenizer, require_transformers
from ..units import parse_size
from ..values import check_seed
from ..vocab.names import is_input_embedding, is_output_embedding, is_vocabulary_tensor
from .approximate import Approximation, Rows, approximate_rows
from .magikarp import WellTrained, keep_well_trained
from .matching import RowAssignment, assign_rows, output_size, rows_within
from .rope import Rotary
from .vocabulary import Token, normalized_vocabulary

MATCH_CHOICES = ("no", "yes", "embed", "lm_head")
# The donor config keys the output takes (mergekit's list; transformers configs have the first three).
DONOR_CONFIG_KEYS = ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "mask_token_id", "padding_side")
PURPOSE = "tokensurgeon"


@dataclass(kw_only=True)
class SurgeryReport(OutputReport):
    """What a tokensurgeon run wrote; `str(report)` is the CLI's summary."""

    method: str
    vocab_size: int
    rows: dict[str, dict[str, int]]  # rebuilt tensor -> rule -> rows

    def __str__(self) -> str:
        rows = [f"{name}: " + ", ".join(f"{n} {rule}" for rule, n in counts.items()) for name, counts in self.rows.items()]
        return self.summary(f"gave the model the donor's tokenizer ({self.vocab_size} tokens, new rows by "
                            f"{self.method})", rows)


def tokensurgeon(model: str | Path, donor: str | Path, out_dir: str | Path, *, method: str = "omp", k: int = 64,
                 cosine_similarity: bool = False, weight_scheme: str = "distance_proportional",
                 subword_method: str = "mean", batch_size: int | None = 512, prefix_match: str = "no",
                 byte_match: str = "no", new_vocab_noise: float | None = None, new_vocab_scale: float | None = None,
                 magikarp: bool = False, device: str = "auto", out_shard_size: str | int = DEFAULT_SHARD_SIZE, seed: int = 0,
                 allow_pickle: bool = False, overwrite: bool = False, quiet: bool = False) -> SurgeryReport:
    """Write `model` with `donor`'s tokenizer into `out_dir` (module doc).

    prefix_match / byte_match: "no", "yes", "embed" (the input embedding only) or "lm_head"
    (lm_head only); whether a donor token may take the model's row of a prefix of it / of the
    other spelling of the same byte. `magikarp`: use only the tokens well trained in both models
    (magikarp.py). `seed` seeds randn, john_hewitt and the noise; `quiet` hides the progress bar.
    """
    started = time.perf_counter()
    reset_peak_rss()
    check_seed(seed)
    settings = Approximation(method, k, cosine_similarity, weight_scheme, subword_method, batch_size,
                             new_vocab_noise, new_vocab_scale)
    settings.check()
    for flag, value in (("--prefix-match", prefix_match), ("--byte-match", byte_match)):
        if value not in MATCH_CHOICES:
            raise ConfigError(f"{flag} {value!r} is not one of {', '.join(MATCH_CHOICES)}")
    max_shard = parse_size(out_shard_size)
    torch_device = resolve_device(device)
    require_transformers(PURPOSE)
    with Checkpoint(_directory(model, "MODEL"), allow_pickle=allow_pickle) as original, \
            Checkpoint(_directory(donor, "DONOR"), allow_pickle=allow_pickle) as giver:
        config = _model_config(original)
        donor_ids = _donor_token_ids(giver)
        tensors = _Tensors.of(original, giver)
        rotary = _rotary(original, giver, tensors) if method == "mp_rope" else None
        why = "tokensurgeon matches the two models' vocabularies token by token"
        model_tokenizer = open_tokenizer(original.path, PURPOSE, why)
        donor_tokenizer = open_tokenizer(giver.path, PURPOSE, why)
        model_vocab, donor_vocab = normalized_vocabulary(model_tokenizer), normalized_vocabulary(donor_tokenizer)
        judged = _judge_training(original, giver, tensors, model_vocab, donor_vocab) if magikarp else None
        surgery = _Surgery(original, giver, judged.model_vocab if judged else model_vocab, donor_vocab, model_tokenizer,
                           settings, prefix_match, byte_match, judged.untrained if judged else None,
                           torch.Generator().manual_seed(seed), torch_device, rotary, quiet)
        size = output_size(donor_vocab)
        with StagedOutput(out_dir, [original.path, giver.path], overwrite=overwrite,
                          read_files=[*original.files, *giver.files]) as staged:
            specs = [(name, original.info(name).dtype,
                      (size, *original.info(name).shape[1:]) if name in tensors.vocabulary else tuple(original.info(name).shape))
                     for name in original.names]
            writer = ShardedWriter(staged.path, specs, max_shard)
            counts = {}
            try:
                for name, donor_name, is_lm_head in tensors.rebuilt():
                    assignment, tensor = _rebuild(surgery, name, donor_name, is_lm_head)
                    counts[name] = assignment.counts
                    writer.write(name, tensor)
                    del tensor
                for name in tqdm(original.names, desc="tensors", disable=quiet, leave=False):
                    if name in tensors.vocabulary and name not in counts:
                        writer.write(name, _remap_exact(original.tensor(name), surgery.model_vocab, donor_vocab, size))
                    elif name not in tensors.vocabulary:
                        writer.write(name, original.tensor(name))
                    original.release(name)
                writer.finalize()
            finally:
                writer.close()
            config["vocab_size"] = size
            config.update(donor_ids)
            write_model_config(config, staged.path / "config.json", None)
            donor_tokenizer.save_pretrained(str(staged.path))
            final = staged.commit()
    notes = [] if tensors.lm_head else ["the model has no lm_head of its own (tied embeddings); the output keeps them tied"]
    if judged is not None:
        notes.append(judged.note())
    return SurgeryReport(output_dir=final, method=method, vocab_size=size, rows=counts, shards=writer.shard_names,
                         bytes_written=writer.total_bytes, seconds=time.perf_counter() - started,
                         peak_rss_bytes=peak_rss_bytes(), notes=notes)


def _directory(path: str | Path, what: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"{what} {path}: not a model directory (tokensurgeon needs its weights, config.json "
                              "and tokenizer files)")
    return directory


def _model_config(checkpoint: Checkpoint) -> dict:
    config = checkpoint.required_config("the output's config is the model's with the new vocab_size")
    if "vocab_size" not in config and isinstance(config.get("text_config"), dict):
        raise CheckpointError(f"{checkpoint.path}/config.json: the vocabulary size is in text_config (a multimodal "
                              "model); tokensurgeon supports models with a top-level vocab_size")
    return dict(config)


def _donor_token_ids(donor: Checkpoint) -> dict[str, Any]:
    """The special token ids the output takes from the donor, as transformers reads its config."""
    transformers = require_transformers(PURPOSE)
    try:
        config = transformers.AutoConfig.from_pretrained(str(donor.path))
    except Exception as exc:  # transformers raises many types for an unreadable config
        raise CheckpointError(f"{donor.path}: transformers cannot read the donor's config.json ({type(exc).__name__}: "
                              f"{exc}); tokensurgeon takes its special token ids from it") from None
    return {key: getattr(config, key) for key in DONOR_CONFIG_KEYS if hasattr(config, key)}


@dataclass
class _Tensors:
    """The token-indexed tensors: the model's input embedding and lm_head (None when tied), the
    donor's counterparts, and every vocabulary-indexed name of the model (biases too)."""

    embed: str
    lm_head: str | None
    donor_embed: str
    donor_lm_head: str
    vocabulary: set[str]

    @classmethod
    def of(cls, model: Checkpoint, donor: Checkpoint) -> _Tensors:
        embed = _one(model, [n for n in model.names if is_input_embedding(n)], "input embedding", required=True)
        lm_head = _one(model, [n for n in model.names if _is_lm_head(n)], "output embedding (lm_head)", required=False)
        donor_embed = _one(donor, [n for n in donor.names if is_input_embedding(n)], "input embedding", required=True)
        donor_lm_head = _one(donor, [n for n in donor.names if _is_lm_head(n)], "output embedding (lm_head)",
                             required=False) or donor_embed
        for checkpoint, name in ((model, embed), (model, lm_head), (donor, donor_embed), (donor, donor_lm_head)):
            if name is not None and len(checkpoint.info(name).shape) != 2:
                raise CheckpointError(f"{checkpoint.path}: {name} has shape {list(checkpoint.info(name).shape)}; "
                                      "tokensurgeon needs a [vocabulary, hidden] matrix")
        vocabulary = {n for n in model.names if is_vocabulary_tensor(n)}
        return cls(embed, lm_head, donor_embed, donor_lm_head, vocabulary)

    def rebuilt(self) -> list[tuple[str, str, bool]]:
        """(model tensor, donor tensor, whether it is lm_head) for each matrix to rebuild."""
        return [(self.embed, self.donor_embed, False)] + ([(self.lm_head, self.donor_lm_head, True)] if self.lm_head else [])


def _is_lm_head(name: str) -> bool:
    return is_output_embedding(name) and name.endswith(".weight")


def _one(checkpoint: Checkpoint, names: list[str], what: str, required: bool) -> str | None:
    if len(names) > 1:
        raise CheckpointError(f"{checkpoint.path}: more than one {what}: {', '.join(names)}")
    if not names and required:
        raise CheckpointError(f"{checkpoint.path}: no {what} tensor (model.embed_tokens.weight or another name for "
                              "it: wte, word_embeddings, tok_embeddings)")
    return names[0] if names else None


def _judge_training(model: Checkpoint, donor: Checkpoint, tensors: _Tensors, model_vocab: dict[Token, int],
                    donor_vocab: dict[Token, int]) -> WellTrained:
    """--magikarp's verdict on both models (magikarp.py), their matrices' pages given back after."""
    judged = keep_well_trained(model_vocab, donor_vocab, model.tensor(tensors.embed),
                               model.tensor(tensors.lm_head) if tensors.lm_head else None,
                               donor.tensor(tensors.donor_embed), donor.tensor(tensors.donor_lm_head))
    for checkpoint, names in ((model, (tensors.embed, tensors.lm_head)), (donor, (tensors.donor_embed, tensors.donor_lm_head))):
        for name in set(names) - {None}:
            checkpoint.release(name)
    return judged


@dataclass
class _Surgery:
    """What every rebuilt matrix is made from: the two checkpoints, their normalized vocabularies
    (the model's cut to well-trained tokens under --magikarp, `untrained` the donor tokens left
    zero), the model's tokenizer (subword), the settings and where the approximation runs."""

    model: Checkpoint
    donor: Checkpoint
    model_vocab: dict[Token, int]
    donor_vocab: dict[Token, int]
    tokenizer: Any
    settings: Approximation
    prefix_match: str
    byte_match: str
    untrained: set[Token] | None
    generator: torch.Generator
    device: torch.device
    rotary: tuple[Rotary, Rotary] | None
    quiet: bool


def _rebuild(surgery: _Surgery, name: str, donor_name: str, is_lm_head: bool) -> tuple[RowAssignment, torch.Tensor]:
    """One token-indexed matrix in the donor's vocabulary (matching.py, then approximate.py)."""
    which = "lm_head" if is_lm_head else "embed"
    original, lender = surgery.model.tensor(name), surgery.donor.tensor(donor_name)
    assignment = assign_rows(surgery.model_vocab, surgery.donor_vocab, original.shape[0], lender.shape[0],
                             allow_byte=surgery.byte_match in ("yes", which),
                             allow_prefix=surgery.prefix_match in ("yes", which), untrained=surgery.untrained)
    out = torch.zeros((assignment.size, original.shape[1]), dtype=original.dtype)
    if assignment.copies:
        targets = torch.tensor(list(assignment.copies), dtype=torch.long)
        sources = torch.tensor(list(assignment.copies.values()), dtype=torch.long)
        out[targets] = original[sources]
    if assignment.approximate:
        rows = Rows(original, lender, rows_within(surgery.model_vocab, original.shape[0]),
                    rows_within(surgery.donor_vocab, lender.shape[0]), is_lm_head, surgery.tokenizer, surgery.generator,
                    surgery.device, name, surgery.rotary)
        new = approximate_rows(assignment.approximate, rows, surgery.settings, quiet=surgery.quiet)
        out[torch.tensor([surgery.donor_vocab[t] for t in assignment.approximate], dtype=torch.long)] = new
    surgery.model.release(name)
    surgery.donor.release(donor_name)
    return assignment, out


def _rotary(model: Checkpoint, donor: Checkpoint, tensors: _Tensors) -> tuple[Rotary, Rotary]:
    """mp_rope's RoPE layouts (the model's, the donor's) from the two config.json files, checked
    against the widths of the matrices they rotate."""
    def layout(checkpoint: Checkpoint, names: tuple[str | None, ...]) -> Rotary:
        config = checkpoint.required_config("mp_rope reads num_attention_heads and rope_theta from it")
        return Rotary.of(config, checkpoint.path, {name: checkpoint.info(name).shape[1] for name in names if name is not None})

    return layout(model, (tensors.embed, tensors.lm_head)), layout(donor, (tensors.donor_embed, tensors.donor_lm_head))


def _remap_exact(tensor: torch.Tensor, model_vocab: dict[Token, int], donor_vocab: dict[Token, int],
                 size: int) -> torch.Tensor:
    """A token-indexed tensor other than the two matrices (an output bias): the model's entry for
    each donor token it has by exact match, zero for the rest."""
    out = tensor.new_zeros((size, *tensor.shape[1:]))
    for token, target in donor_vocab.items():
        source = model_vocab.get(token)
        if source is not None and source < tensor.shape[0]:
            out[target] = tensor[source]
    return out
