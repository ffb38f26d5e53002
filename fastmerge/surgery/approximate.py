"""Rows for the donor tokens the model has no row for: mergekit-tokensurgeon 0.1.5's methods.

The methods that use the shared vocabulary (the tokens both tokenizers have, ordered by donor
id) work in two spaces: each target token is expressed as a combination of shared tokens in the
donor's embedding space, where the target has a row, and the same combination of the model's
rows for those shared tokens is the new row. So the donor may have a different hidden size.

- omp: orthogonal matching pursuit. k times, pick the unused shared token whose donor row is
  most correlated (|dot product|) with what is still unexplained of the target, then fit the
  target by least squares on the picked rows (an incrementally built QR factorization; each new
  column is orthogonalized twice, which keeps the basis orthogonal in fp32 for large k).
- common_interpolation: the k nearest shared tokens (Euclidean distance, or 1 - cosine
  similarity with --cosine-similarity), weighted by `weight_scheme`: distance_proportional
  (1 / distance, or the cosine similarity, normalized to sum 1), barycentric (the affine
  combination, weights summing to 1, closest to the target: least squares on the bordered Gram
  system), least_squares (the unconstrained least-squares fit).
- landmark_pca, stb: one affine map from the donor's space to the model's fitted on the shared
  tokens (affine.py): a Procrustes rotation between the two spaces' principal components, or
  a sparse token basis (OMP combinations of shared tokens approximating the principal
  directions) in which each donor row is expressed and rebuilt from the model's rows.
- mean: the mean of all the model's rows. zero: zeros.
- subword: the model's rows of the pieces the model's tokenizer splits the token's text into,
  combined by `subword_method`: mean, sum, weighted_mean (weights 1..n, the last piece weighing
  most for the input embedding and the first for lm_head, as mergekit's comment says; its code
  weighs them the other way round), first_last (the first piece's row for lm_head, the last's
  for the input embedding).
- john_hewitt: draws from a normal distribution with the mean and covariance of the model's
  rows (Hewitt, 2021); small Gaussian noise (std 0.02) when the covariance is singular.
- randn: standard normal draws.

- mp_rope: matching pursuit in which each picked shared token's donor row is first rotated by
  RoPE to the position that best turns it towards the residual; the new row combines the
  model's rows of those tokens rotated to the same positions with the model's heads and
  rope_theta (rope.py: both models' config.json give num_attention_heads and rope_theta).

The arithmetic runs in fp32 (fp64 for fp64 tensors; the covariance in fp64) and each new row is
rounded once to the tensor's dtype (mergekit's landmark_pca rounds to the donor's dtype first);
mean runs in the tensor's own dtype as mergekit computes it, so its rows are mergekit's bytes. Random methods draw from the run's seeded generator, in donor
id order, so a seed always gives the same rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError
from ..values import is_integer
from .affine import landmark_pca, sparse_token_basis
from .moments import cross_gram, mean64
from .pursuit import orthogonal_matching_pursuit
from .rope import Rotary, matching_pursuit_rope
from .vocabulary import Token, text_of

METHODS = ("omp", "common_interpolation", "landmark_pca", "stb", "mp_rope", "mean", "zero", "subword", "john_hewitt",
           "randn")
WEIGHT_SCHEMES = ("distance_proportional", "barycentric", "least_squares")
SUBWORD_METHODS = ("mean", "sum", "weighted_mean", "first_last")
_AFFINE_METHODS = ("landmark_pca", "stb")  # one map for all tokens (affine.py)
_EPS = 1e-6


@dataclass(frozen=True)
class Approximation:
    """How the rows the model lacks are made (the module doc explains each setting)."""

    method: str = "omp"
    k: int = 64
    cosine_similarity: bool = False
    weight_scheme: str = "distance_proportional"
    subword_method: str = "mean"
    batch_size: int | None = 512  # None or <= 0: every token in one batch (stb: also its directions per OMP batch)
    new_vocab_noise: float | None = None
    new_vocab_scale: float | None = None

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown approximation method {self.method!r}; fastmerge implements {', '.join(METHODS)}")
        if not is_integer(self.k) or self.k < 1:
            raise ConfigError(f"--k must be a positive integer (shared tokens per approximated token), got {self.k!r}")
        if self.weight_scheme not in WEIGHT_SCHEMES:
            raise ConfigError(f"--weight-scheme {self.weight_scheme!r} is not one of {', '.join(WEIGHT_SCHEMES)}")
        if self.subword_method not in SUBWORD_METHODS:
            raise ConfigError(f"--subword-method {self.subword_method!r} is not one of {', '.join(SUBWORD_METHODS)}")
        if self.batch_size is not None and not is_integer(self.batch_size):
            raise ConfigError(f"--batch-size must be an integer (-1: no batching), got {self.batch_size!r}")
        for flag, value in (("--new-vocab-noise", self.new_vocab_noise), ("--new-vocab-scale", self.new_vocab_scale)):
            if value is not None and not math.isfinite(value):  # it would reach every new row
                raise ConfigError(f"{flag} must be a finite number, got {value!r}")

    def batch(self, total: int) -> int:
        """Items handled at once out of `total`: --batch-size, or all of them when it is unset or <= 0."""
        return self.batch_size if self.batch_size and self.batch_size > 0 else total


@dataclass
class Rows:
    """What the methods read for one output tensor: the model's and the donor's token-indexed
    matrices (vocabulary first), their normalized vocabularies limited to the rows they have,
    whether it is lm_head, the model's tokenizer (subword), the seeded generator, the device
    the shared-vocabulary methods compute on and (mp_rope) both models' RoPE layouts."""

    model: torch.Tensor
    donor: torch.Tensor
    model_vocab: dict[Token, int]
    donor_vocab: dict[Token, int]
    is_lm_head: bool
    tokenizer: Any
    generator: torch.Generator
    device: torch.device
    name: str
    rotary: tuple[Rotary, Rotary] | None = None  # mp_rope: the model's and the donor's RoPE layout


def approximate_rows(tokens: list[Token], rows: Rows, settings: Approximation, quiet: bool = True) -> torch.Tensor:
    """The new rows for `tokens` (donor tokens the model lacks), in the model tensor's dtype, on
    the CPU, batch by batch (a progress bar unless `quiet`: omp on a real vocabulary takes
    minutes), with --new-vocab-noise then --new-vocab-scale applied."""
    out = torch.empty((len(tokens), rows.model.shape[1]), dtype=rows.model.dtype)
    if not tokens:
        return out
    compute = _method(rows, settings)
    step = settings.batch(len(tokens))
    for start in tqdm(range(0, len(tokens), step), desc=f"approximating {rows.name}", disable=quiet, leave=False):
        batch = compute(tokens[start:start + step])
        if settings.new_vocab_noise:
            batch = batch + torch.randn(batch.shape, generator=rows.generator, dtype=batch.dtype) * settings.new_vocab_noise
        if settings.new_vocab_scale:
            batch = batch * settings.new_vocab_scale
        out[start:start + step] = batch
    return out


def _method(rows: Rows, settings: Approximation) -> Callable[[list[Token]], torch.Tensor]:
    dtype, width = rows.model.dtype, rows.model.shape[1]
    if settings.method == "zero":
        return lambda tokens: torch.zeros((len(tokens), width), dtype=dtype)
    if settings.method == "mean":
        mean = rows.model.mean(dim=0)
        return lambda tokens: mean.expand(len(tokens), width)
    if settings.method == "randn":
        return lambda tokens: torch.randn((len(tokens), width), generator=rows.generator, dtype=dtype)
    if settings.method == "john_hewitt":
        return _john_hewitt(rows)
    if settings.method == "subword":
        return lambda tokens: _subword(tokens, rows, settings.subword_method)
    return _shared_vocabulary_method(rows, settings)


def _rows_of(matrix: torch.Tensor, vocab: dict[Token, int], tokens: list[Token]) -> torch.Tensor:
    """The rows of a token-indexed matrix for `tokens`, in that order."""
    return matrix[torch.tensor([vocab[t] for t in tokens], dtype=torch.long)]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shared_vocabulary_method(rows: Rows, settings: Approximation) -> Callable[[list[Token]], torch.Tensor]:
    shared = sorted(set(rows.model_vocab) & set(rows.donor_vocab), key=rows.donor_vocab.__getitem__)
    if not shared:
        raise CheckpointError(f"{rows.name}: the model's and the donor's tokenizers share no token, so "
                              f"{settings.method} has nothing to build new rows from; use mean, zero, subword or randn")
    if settings.method != "landmark_pca" and settings.k > len(shared):  # landmark_pca has no k
        raise ConfigError(f"--k {settings.k}: the two tokenizers share only {len(shared)} tokens ({rows.name}); "
                          f"give --k {len(shared)} or less")
    basis_size = min(rows.model.shape[1], rows.donor.shape[1])
    if settings.method == "stb" and settings.k > basis_size:
        raise ConfigError(f"--k {settings.k}: stb fits each basis vector with k shared tokens in {basis_size} dimensions "
                          f"(the smaller hidden size, {rows.name}), where more than {basis_size} are linearly dependent; "
                          f"give --k {basis_size} or less")
    work = _work_dtype(rows.donor.dtype)
    device = rows.device

    def donor_rows(tokens: list[Token]) -> torch.Tensor:
        return _rows_of(rows.donor, rows.donor_vocab, tokens).to(device, work)

    donor_shared = donor_rows(shared)
    model_shared = _rows_of(rows.model, rows.model_vocab, shared).to(device, _work_dtype(rows.model.dtype))
    if settings.method in _AFFINE_METHODS:
        if settings.method == "landmark_pca":
            mapping = landmark_pca(donor_shared, model_shared)
        else:
            mapping = sparse_token_basis(donor_shared, model_shared, settings.k, settings.batch(donor_shared.shape[1]))
        del donor_shared, model_shared

        def apply(tokens: list[Token]) -> torch.Tensor:
            targets = donor_rows(tokens)
            return mapping.apply(targets.to(mapping.matrix.dtype)).to(rows.model.dtype).cpu()

        return apply

    if settings.method == "mp_rope" and rows.rotary is None:
        raise ConfigError(f"{rows.name}: mp_rope needs both models' num_attention_heads and rope_theta (Rows.rotary)")

    def compute(tokens: list[Token]) -> torch.Tensor:
        targets = donor_rows(tokens)
        if settings.method == "mp_rope":
            model_rotary, donor_rotary = rows.rotary
            new = matching_pursuit_rope(targets, donor_shared, model_shared, settings.k, donor_rotary, model_rotary)
            return new.to(rows.model.dtype).cpu()
        if settings.method == "omp":
            picked, coefficients = orthogonal_matching_pursuit(targets, donor_shared, settings.k)
        else:
            picked, coefficients = common_interpolation(targets, donor_shared, settings.k, settings.cosine_similarity,
                                                        settings.weight_scheme)
        combined = torch.bmm(coefficients.unsqueeze(1).to(model_shared.dtype), model_shared[picked]).squeeze(1)
        return combined.to(rows.model.dtype).cpu()

    return compute


def common_interpolation(targets: torch.Tensor, points: torch.Tensor, k: int, cosine: bool,
                         scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest points (N, D) to each target (B, D) and their weights (see the module doc)."""
    if cosine:
        norms = targets.norm(dim=1, keepdim=True) * points.norm(dim=1, keepdim=True).T
        distances = 1 - (targets @ points.T) / norms.clamp(min=_EPS)
    else:
        distances = torch.cdist(targets, points)
    nearest_distances, nearest = torch.topk(distances, k, dim=1, largest=False)
    neighbours = points[nearest]  # (B, k, D)
    if scheme == "distance_proportional":
        closeness = 1 - nearest_distances if cosine else 1 / nearest_distances.clamp(min=_EPS)
        weights = closeness / closeness.sum(dim=1, keepdim=True).clamp(min=_EPS)
    elif scheme == "barycentric":
        weights = _affine_weights(targets, neighbours)
    else:
        weights = torch.linalg.lstsq(neighbours.transpose(1, 2), targets.unsqueeze(-1)).solution.squeeze(-1)
    return nearest, weights


def _affine_weights(targets: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Weights w summing to 1 that minimize |w @ neighbours - target|: the normal equations with
    a Lagrange multiplier, [[G, 1], [1^T, 0]] [w; mu] = [neighbours @ target; 1], G the Gram matrix,
    solved by least squares (G may be singular)."""
    batch, count, _ = neighbours.shape
    system = neighbours.new_zeros((batch, count + 1, count + 1))
    system[:, :count, :count] = torch.bmm(neighbours, neighbours.transpose(1, 2))
    system[:, :count, count] = 1
    system[:, count, :count] = 1
    rhs = neighbours.new_ones((batch, count + 1))
    rhs[:, :count] = torch.bmm(neighbours, targets.unsqueeze(-1)).squeeze(-1)
    return torch.linalg.lstsq(system, rhs.unsqueeze(-1)).solution.squeeze(-1)[:, :count]


def _subword(tokens: list[Token], rows: Rows, how: str) -> torch.Tensor:
    model = rows.model
    out = torch.zeros((len(tokens), model.shape[1]), dtype=_work_dtype(model.dtype))
    for i, token in enumerate(tokens):
        pieces = rows.tokenizer(text_of(token), add_special_tokens=False)["input_ids"]
        beyond = [p for p in pieces if not 0 <= p < model.shape[0]]
        if beyond:
            raise CheckpointError(f"{rows.name}: the model's tokenizer splits {text_of(token)!r} into token id {beyond[0]}, "
                                  f"beyond the tensor's {model.shape[0]} rows")
        if not pieces:
            continue
        if how == "first_last":
            out[i] = model[pieces[0] if rows.is_lm_head else pieces[-1]].to(out.dtype)
            continue
        weights = [1] * len(pieces) if how in ("mean", "sum") else list(range(1, len(pieces) + 1))
        if how == "weighted_mean" and rows.is_lm_head:
            weights.reverse()  # the first piece weighs most for lm_head, the last for the embedding
        for piece, weight in zip(pieces, weights):
            row = model[piece].to(out.dtype)
            out[i] += row if how in ("mean", "sum") else weight * row
        if how != "sum":
            out[i] /= sum(weights)
    return out.to(model.dtype)


def _john_hewitt(rows: Rows) -> Callable[[list[Token]], torch.Tensor]:
    model = rows.model
    mean = mean64(model)
    factor, info = torch.linalg.cholesky_ex(cross_gram(model, mean, model, mean) / model.shape[0])
    if int(info) != 0:
        return lambda tokens: torch.randn((len(tokens), model.shape[1]), generator=rows.generator,
                                          dtype=model.dtype) * 0.02
    mean32, factor32 = mean.float(), factor.float()

    def draw(tokens: list[Token]) -> torch.Tensor:
        normal = torch.randn((len(tokens), model.shape[1]), generator=rows.generator, dtype=torch.float32)
        return (mean32 + normal @ factor32.T).to(model.dtype)

    return draw
