"""mp_rope: matching pursuit through rotary position embeddings (mergekit-tokensurgeon 0.1.5's
`mp_rope`, its batch_mp_rope).

Each row (width D) is read as a query vector of `num_attention_heads` heads of D / heads
dimensions, in which RoPE rotates dimension d of a head with d + head_dim / 2 (the transformers
Llama layout) by the angle position x f_d, f_d = rope_theta^(-2d / head_dim). A donor token the
model lacks is approximated by k shared tokens, each rotated to a position of its own:

- k times: pick the unused shared token whose donor row is most correlated (|dot product|) with
  what is still unexplained of the target (the residual), as omp does; find the position that
  rotates that row towards the residual: the angle from the row to the residual in each rotated
  pair, atan2(cross, dot), fitted by least squares as position x f_d over every head and pair;
  the same for the negated residual, keeping the position of smaller magnitude; rotate the row
  there and take its projection off the residual (plain matching pursuit: earlier coefficients
  are not refitted).
- the coefficients: the least-squares fit of the target by the k rotated donor rows.
- the new row: the same coefficients times the model's rows of the same tokens, each rotated to
  the same position with the model's heads and rope_theta.

Both models' config.json must give num_attention_heads and rope_theta (top level, or in
rope_parameters as transformers 5 writes it); each model's rows must split into an even
head_dim. The arithmetic runs in fp32 (fp64 for fp64 rows), each new row rounded once to the
model tensor's dtype.

Deliberate differences from mergekit 0.1.5:
- mergekit reads `config.rope_theta` through transformers; a config without it takes the config
  class's default there (transformers 5 has no such attribute at all, so mergekit's mp_rope
  fails under it), here a config without rope_theta is an error that names the file.
- mergekit rounds the new rows to the donor's dtype, then to the model's; here they are rounded
  once, to the model's, and the model's rows are combined in the model's working precision.
- its position estimator (`estimate_pos_id_best`) returns the least-squares projection right
  away; the weighted estimator and the choice between the two after the return are dead code,
  not reproduced. Its small epsilons on norms that are at least 1 are left out.
- rope_scaling and partial rotary factors are ignored, as in mergekit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..values import is_finite_number, is_integer
from .pursuit import pick_most_correlated


@dataclass(frozen=True)
class Rotary:
    """One model's RoPE layout for its token rows: attention heads and rope_theta."""

    heads: int
    base: float

    @classmethod
    def of(cls, config: dict[str, Any], directory: Path, widths: dict[str, int]) -> Rotary:
        """The layout in `directory`/config.json (`config`), checked against the widths of the
        token-indexed tensors (name -> hidden size) it will rotate."""
        where = f"{directory}/config.json"
        heads = config.get("num_attention_heads")
        if not is_integer(heads) or heads < 1:
            raise ConfigError(f"{where}: mp_rope needs a positive integer num_attention_heads, got {heads!r}")
        base = config.get("rope_theta")
        if base is None and isinstance(config.get("rope_parameters"), dict):
            base = config["rope_parameters"].get("rope_theta")
        if not is_finite_number(base) or base <= 0:
            raise ConfigError(f"{where}: mp_rope needs rope_theta (top level or in rope_parameters), a positive number; "
                              f"got {base!r}")
        for name, width in widths.items():
            if width % heads or (width // heads) % 2:
                raise ConfigError(f"{where}: {name} has {width} columns, which num_attention_heads {heads} does not split "
                                  f"into heads of an even size; mp_rope rotates pairs of dimensions within each head")
        return cls(heads, float(base))

    def frequencies(self, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """f_d = base^(-2d / head_dim) for the head_dim / 2 rotated pairs."""
        head_dim = width // self.heads
        exponents = torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim
        return 1.0 / self.base ** exponents

    def _pairs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two members of each rotated pair, (..., heads, head_dim / 2) each."""
        heads = rows.reshape(*rows.shape[:-1], self.heads, rows.shape[-1] // self.heads)
        return heads.chunk(2, dim=-1)

    def rotate(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE at `positions` (rows' shape without the last dimension) applied to `rows`."""
        first, second = self._pairs(rows)
        angles = positions[..., None, None] * self.frequencies(rows.shape[-1], rows.dtype, rows.device)
        cos, sin = torch.cos(angles), torch.sin(angles)
        rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
        return rotated.reshape(rows.shape)

    def position(self, rows: torch.Tensor, towards: torch.Tensor) -> torch.Tensor:
        """The position p whose rotation turns `rows` towards `towards`: each pair's angle from
        the one to the other (in (-pi, pi]) fitted by least squares as p x f_d."""
        first, second = self._pairs(rows)
        first_to, second_to = self._pairs(towards)
        angles = torch.atan2(first * second_to - second * first_to, first * first_to + second * second_to)
        frequencies = self.frequencies(rows.shape[-1], rows.dtype, rows.device)
        return (angles * frequencies).sum(dim=(-2, -1)) / (self.heads * frequencies.square().sum())


def matching_pursuit_rope(targets: torch.Tensor, atoms: torch.Tensor, model_atoms: torch.Tensor, k: int,
                          donor: Rotary, model: Rotary, eps: float = 1e-8) -> torch.Tensor:
    """The new rows (B, model width) for the donor rows `targets` (B, D) from the shared tokens'
    donor rows `atoms` (N, D) and model rows `model_atoms` (N, model width) (module doc), in
    the model rows' dtype."""
    batch = targets.shape[0]
    picked = torch.zeros((batch, k), dtype=torch.long, device=targets.device)
    positions = targets.new_zeros((batch, k))
    rotated = targets.new_zeros((batch, k, targets.shape[1]))
    used = torch.zeros((batch, atoms.shape[0]), dtype=torch.bool, device=targets.device)
    residual = targets
    for step in range(k):
        choice = pick_most_correlated(residual, atoms, used)
        atom = atoms[choice]
        along, against = donor.position(atom, residual), donor.position(atom, -residual)
        position = torch.where(along.abs() < against.abs(), along, against)
        turned = donor.rotate(atom, position)
        share = (residual * turned).sum(dim=1) / turned.square().sum(dim=1).clamp(min=eps)
        residual = residual - share.unsqueeze(1) * turned
        picked[:, step], positions[:, step], rotated[:, step] = choice, position, turned
    coefficients = torch.linalg.lstsq(rotated.transpose(1, 2), targets.unsqueeze(-1)).solution.squeeze(-1)
    del rotated
    chosen = model.rotate(model_atoms[picked], positions.to(model_atoms.dtype))
    return torch.bmm(coefficients.unsqueeze(1).to(chosen.dtype), chosen).squeeze(1)
