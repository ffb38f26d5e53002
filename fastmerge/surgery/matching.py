"""Which output rows are copied from the model and which must be approximated.

The output has one row per donor token id (0 .. the donor's largest id). For each donor token,
in id order, the first rule that finds a row of the model wins:

1. exact: the model has the same normalized token (vocabulary.py);
2. byte (when allowed for this tensor): the model has the other spelling of the same byte,
   "a" for "<0x61>" or the reverse;
3. prefix (when allowed for this tensor): the model has a proper prefix of the token, the
   longest one it has, with the same word-start marker;
4. otherwise the row is approximated by the chosen method (approximate.py).

With --magikarp (magikarp.py) the model's vocabulary is first cut to the tokens well trained in
both models, and the donor tokens under-trained in both come before rule 1: their rows stay
zero ("untrained" in the tallies).

Only model tokens whose id is below the tensor's row count can be copied, and donor tokens whose
id is at or above the donor tensor's row count have no donor row to approximate from: their
rows stay zero, as do ids no donor token normalizes to. All of this is mergekit-tokensurgeon
0.1.5's rule set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .vocabulary import Token, byte_counterpart, prefixes


@dataclass
class RowAssignment:
    """For one output tensor: `copies` maps output row -> model row; `approximate` lists the
    donor tokens (in donor id order) whose rows the method fills; `counts` the rule tallies."""

    size: int
    copies: dict[int, int] = field(default_factory=dict)
    approximate: list[Token] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"exact": 0, "byte": 0, "prefix": 0, "approximated": 0})


def output_size(donor_vocab: dict[Token, int]) -> int:
    """Rows of the output's token-indexed tensors: one per donor id up to the largest."""
    return max(len(donor_vocab), max(donor_vocab.values()) + 1)


def rows_within(vocab: dict[Token, int], rows: int) -> dict[Token, int]:
    """The tokens that have a row in a tensor of `rows` rows."""
    return {token: index for token, index in vocab.items() if index < rows}


def assign_rows(model_vocab: dict[Token, int], donor_vocab: dict[Token, int], model_rows: int, donor_rows: int,
                allow_byte: bool, allow_prefix: bool, untrained: set[Token] | None = None) -> RowAssignment:
    """`untrained` (--magikarp): donor tokens whose rows stay zero; None leaves the tally out."""
    model_vocab = rows_within(model_vocab, model_rows)
    assignment = RowAssignment(output_size(donor_vocab))
    if untrained is not None:
        assignment.counts["untrained"] = 0
    for token, donor_id in sorted(donor_vocab.items(), key=lambda item: item[1]):
        if donor_id >= donor_rows:
            continue
        if untrained is not None and token in untrained:
            assignment.counts["untrained"] += 1
            continue
        rule, row = _match(token, model_vocab, allow_byte, allow_prefix)
        if row is None:
            assignment.approximate.append(token)
            assignment.counts["approximated"] += 1
        else:
            assignment.copies[donor_id] = row
            assignment.counts[rule] += 1
    return assignment


def _match(token: Token, model_vocab: dict[Token, int], allow_byte: bool, allow_prefix: bool) -> tuple[str, int | None]:
    if token in model_vocab:
        return "exact", model_vocab[token]
    if allow_byte:
        other = byte_counterpart(token)
        if other is not None and other in model_vocab:
            return "byte", model_vocab[other]
    if allow_prefix:
        for prefix in prefixes(token):
            if prefix in model_vocab:
                return "prefix", model_vocab[prefix]
    return "", None
