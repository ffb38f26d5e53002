"""landmark_pca and stb: one affine map from the donor's embedding space to the model's, fitted
on the shared tokens (the landmarks, whose rows both models have) and applied to every token the
model lacks: new row = (donor row - donor mean) @ matrix + model mean, the means those of the
shared tokens. Unlike omp and common_interpolation nothing is chosen per token, so the map is
fitted once per tensor (mergekit's landmark_pca refits it for every batch) and applying it is
one matmul per batch.

- landmark_pca: both spaces reduced to their q = min(hidden sizes) principal components, then
  the rotation of the donor's component coordinates that best matches the model's (orthogonal
  Procrustes: R = U V^T for A^T B = U S V^T, A and B the shared tokens' coordinates). A model
  space that is a rotation (isometry) of the donor space plus a translation is reproduced
  exactly. Two differences from mergekit 0.1.5's pca.py: the principal components are exact
  (an eigendecomposition of the fp64 covariance; mergekit draws them with the randomized
  torch.pca_lowrank, exact only when the centered rows have rank q or less), and the rotation
  is the optimal one its comment names; its code applies the transpose (it factors B^T A and
  takes U V^T of that). The two agree where R is symmetric, as when the components are well
  separated and the relation exact, and part otherwise: for landmarks with equal variances (no
  preferred axes), or any two spaces not exactly related, where mergekit's rotation is not the
  best fit of the landmarks.

- stb (sparse token basis): the principal directions (d = min(hidden sizes) of them, from the
  space with the smaller hidden size) are each approximated by OMP with k shared tokens
  (centered rows); the same sparse combinations of the shared tokens' centered rows in the donor
  and the model give a donor basis and a model basis that correspond vector by vector. A donor
  row is expressed in the donor basis by least squares (a pseudo-inverse) and the same
  coefficients of the model basis are its new row. When the donor's hidden size is at most the
  model's and the shared rows are related by an affine map, that map is reproduced exactly.
  mergekit 0.1.5 cannot run stb: it passes its options object where k belongs
  (compute_token_basis(..., options) -> `k <= num_pts` raises TypeError). Its code also combines
  the shared tokens' rows *uncentered* with the coefficients OMP fitted on centered rows, so its
  "approximately orthogonal" bases (its docstring) are not, and it centers the donor row with the
  mean of all donor rows and adds the mean of all model rows; here the basis is combined from the
  centered rows it was fitted on and both means are the shared tokens', which is what makes an
  affine relation come through exactly. --k above the smaller hidden size is refused (more atoms
  than dimensions are linearly dependent, and the OMP coefficients of the surplus are arbitrary
  yet carried into the other space).

The fits (covariances, eigendecompositions, the Procrustes SVD, the pseudo-inverse) run in fp64,
accumulated over row chunks so no fp64 copy of a shared matrix is made; OMP runs in the work
dtype (fp32, fp64 for fp64 tensors), like omp; the map is applied in the work dtype and each new
row is rounded once to the model tensor's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .moments import cross_gram, mean64
from .pursuit import orthogonal_matching_pursuit

PINV_RTOL = 1e-6


@dataclass
class AffineMap:
    """x -> (x - donor_mean) @ matrix + model_mean, in the work dtype (the wider of the two
    tensors' work dtypes)."""

    donor_mean: torch.Tensor  # (D_donor,)
    matrix: torch.Tensor  # (D_donor, D_model)
    model_mean: torch.Tensor  # (D_model,)

    def apply(self, donor_rows: torch.Tensor) -> torch.Tensor:
        return (donor_rows - self.donor_mean) @ self.matrix + self.model_mean


def landmark_pca(donor: torch.Tensor, model: torch.Tensor) -> AffineMap:
    """The landmark PCA map (module doc) fitted on the shared tokens' rows `donor` (N, D_donor)
    and `model` (N, D_model), in the same token order."""
    q = min(donor.shape[1], model.shape[1])
    donor_mean, model_mean = mean64(donor), mean64(model)
    donor_axes = _principal_axes(cross_gram(donor, donor_mean, donor, donor_mean), q)  # (D_donor, q)
    model_axes = _principal_axes(cross_gram(model, model_mean, model, model_mean), q)  # (D_model, q)
    # A^T B for A, B the centered rows in component coordinates: axes^T (C_donor^T C_model) axes
    coupling = donor_axes.T @ cross_gram(donor, donor_mean, model, model_mean) @ model_axes
    left, _, right_t = torch.linalg.svd(coupling)
    rotation = left @ right_t  # argmin over orthogonal R of |A R - B|
    matrix = donor_axes @ rotation @ model_axes.T
    return _to_work(donor_mean, matrix, model_mean, torch.promote_types(donor.dtype, model.dtype))


def sparse_token_basis(donor: torch.Tensor, model: torch.Tensor, k: int, batch_size: int) -> AffineMap:
    """The sparse-token-basis map (module doc) fitted on the shared tokens' rows; `batch_size`
    principal directions are fitted by OMP at a time (OMP's memory is batch x hidden x k)."""
    d = min(donor.shape[1], model.shape[1])
    donor_mean, model_mean = mean64(donor), mean64(model)
    work = donor.dtype
    centered_donor = donor - donor_mean.to(work)
    centered_model = model - model_mean.to(model.dtype)
    source = centered_donor if donor.shape[1] < model.shape[1] else centered_model  # mergekit's choice of space
    axes = _principal_axes(cross_gram(source, None, source, None), d)  # (D_source, d)
    directions = axes.T.to(source.dtype).contiguous()
    donor_basis = torch.empty((d, donor.shape[1]), dtype=torch.float64, device=donor.device)
    model_basis = torch.empty((d, model.shape[1]), dtype=torch.float64, device=donor.device)
    for start in range(0, d, batch_size):
        picked, coefficients = orthogonal_matching_pursuit(directions[start:start + batch_size], source, k)
        coefficients = coefficients.double().unsqueeze(1)
        donor_basis[start:start + batch_size] = torch.bmm(coefficients, centered_donor[picked].double()).squeeze(1)
        model_basis[start:start + batch_size] = torch.bmm(coefficients, centered_model[picked].double()).squeeze(1)
    del centered_donor, centered_model, source
    # least-squares coefficients c of a centered donor row x in the donor basis: c = x pinv(basis);
    # directions the basis spans with under PINV_RTOL of its largest singular value are rounding
    # noise (a principal direction of zero variance, fitted by nothing) and get no coefficient
    matrix = torch.linalg.pinv(donor_basis, rtol=PINV_RTOL) @ model_basis
    return _to_work(donor_mean, matrix, model_mean, torch.promote_types(work, model.dtype))


def _principal_axes(gram: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` eigenvectors of a symmetric matrix with the largest eigenvalues, as columns."""
    _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -count:].flip(1)


def _to_work(donor_mean: torch.Tensor, matrix: torch.Tensor, model_mean: torch.Tensor, work: torch.dtype) -> AffineMap:
    return AffineMap(donor_mean.to(work), matrix.to(work), model_mean.to(work))
