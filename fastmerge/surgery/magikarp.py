"""--magikarp: leave out tokens a model never really trained, as mergekit-tokensurgeon 0.1.5 does
(after "Fishing for Magikarp", Land & Bartolo 2024, arXiv:2405.05417).

A token is judged under-trained in a model when any of these holds:
- it is unused: a row no token of the tokenizer has (padding rows), or a token whose text
  contains "unused_token" or "reserved_special_token";
- the model has an lm_head (for the donor: its own, or its input embedding when tied; for the
  model: its own only), and the token's input-embedding row has an L2 norm below the 1% quantile
  of all rows' norms (the rarest tokens keep their small initial norm);
- there are unused rows, and the token's row is closer (cosine similarity) to the mean of the
  unused rows than the 99% quantile of all rows' similarities, or 0.5 when that quantile is lower,
  in the input embedding or in lm_head (the rows training never moved stay alike).
Quantiles interpolate linearly (torch.quantile) over every row, padding rows included.

The surgery then uses only the tokens well trained in both models: the model's vocabulary is cut
to them (so only they are copied, or anchor an approximation, and a donor token whose model row
is under-trained is approximated like a new one; byte and prefix matches too find only such
tokens, as in mergekit), and a donor token under-trained in the donor that the model does not
have well trained is left a zero row in every rebuilt tensor.

The norms and similarities are computed in fp32 a row chunk at a time (mergekit computes them
in the tensor's dtype, so for bf16 models a token at a threshold may fall the other way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .vocabulary import Token, text_of

QUANTILE = 0.01
MIN_SIMILARITY = 0.5  # a similarity threshold below this is raised to it
UNUSED_MARKERS = ("unused_token", "reserved_special_token")
_CHUNK = 65536


@dataclass
class WellTrained:
    """The outcome for the surgery: `model_vocab` cut to the tokens well trained in both models,
    and `untrained`, the donor tokens whose rows are left zero; the counts are for the report."""

    model_vocab: dict[Token, int]
    untrained: set[Token]
    model_bad: int
    donor_bad: int

    def note(self) -> str:
        return (f"--magikarp: {self.model_bad} of the model's rows and {self.donor_bad} of the donor's judged "
                f"under-trained; {len(self.model_vocab)} shared well-trained tokens kept, {len(self.untrained)} "
                "donor tokens left zero")


def well_trained_tokens(vocab: dict[Token, int], embed: torch.Tensor, lm_head: torch.Tensor | None) -> tuple[set[Token], int]:
    """The tokens of `vocab` well trained in a model with these matrices (module doc), and how
    many rows were judged under-trained."""
    rows = embed.shape[0]
    unused = set(range(rows)) - set(vocab.values())
    unused |= {index for token, index in vocab.items()
               if index < rows and any(marker in text_of(token) for marker in UNUSED_MARKERS)}
    bad = set(unused)
    if lm_head is not None:
        norms = _row_norms(embed)
        bad |= set(torch.nonzero(norms < torch.quantile(norms, QUANTILE)).flatten().tolist())
    if unused:
        for matrix in (embed, lm_head):
            if matrix is None:
                continue
            index = torch.tensor(sorted(i for i in unused if i < matrix.shape[0]), dtype=torch.long)
            similarity = _similarity_to(matrix, matrix[index].float().mean(dim=0))
            threshold = max(torch.quantile(similarity, 1 - QUANTILE).item(), MIN_SIMILARITY)
            bad |= set(torch.nonzero(similarity > threshold).flatten().tolist())
    return {token for token, index in vocab.items() if index not in bad}, len(bad)


def keep_well_trained(model_vocab: dict[Token, int], donor_vocab: dict[Token, int], model_embed: torch.Tensor,
                      model_lm_head: torch.Tensor | None, donor_embed: torch.Tensor,
                      donor_lm_head: torch.Tensor) -> WellTrained:
    """Judge both models (the donor's lm_head is its input embedding when tied) and cut the
    vocabularies as the module doc says."""
    model_good, model_bad = well_trained_tokens(model_vocab, model_embed, model_lm_head)
    donor_good, donor_bad = well_trained_tokens(donor_vocab, donor_embed, donor_lm_head)
    both = model_good & donor_good
    kept = {token: index for token, index in model_vocab.items() if token in both}
    untrained = {token for token in donor_vocab if token not in donor_good and token not in model_good}
    return WellTrained(kept, untrained, model_bad, donor_bad)


def _row_norms(matrix: torch.Tensor) -> torch.Tensor:
    return torch.cat([matrix[start:start + _CHUNK].float().norm(dim=1) for start in range(0, matrix.shape[0], _CHUNK)])


def _similarity_to(matrix: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row to `reference` (norms clamped at 1e-8, as torch's)."""
    reference_norm = reference.norm().clamp(min=1e-8)
    parts = []
    for start in range(0, matrix.shape[0], _CHUNK):
        chunk = matrix[start:start + _CHUNK].float()
        parts.append((chunk @ reference) / (chunk.norm(dim=1).clamp(min=1e-8) * reference_norm))
    return torch.cat(parts)
