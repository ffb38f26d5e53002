"""slerp, nuslerp, multislerp against formulas written here in fp64, and the classic
gradient-slerp config end to end on sharded bf16 checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from _support import load_dir, write_config
from fastmerge import merge_tensors, run
from fastmerge.errors import ConfigError


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def slerp_formula(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Textbook slerp of two vectors (fp64), lerp when nearly parallel."""
    a, b = v0.double(), v1.double()
    cos = float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-6) -> None:
    scale = expected.abs().max().item()
    assert (actual.double() - expected.double()).abs().max().item() <= rel * scale


@pytest.mark.parametrize("shape", [(12, 20), (33,)])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_formula(shape, t):
    base, model = rand(*shape, seed=1), rand(*shape, seed=2)
    close(merge_tensors("slerp", [model], base=base, t=t), slerp_formula(t, base, model))


def test_slerp_of_parallel_tensors_is_linear():
    base = rand(6, 7, seed=3)
    out = merge_tensors("slerp", [2 * base], base=base, t=0.25)
    close(out, 1.25 * base.double())


def test_slerp_needs_t():
    with pytest.raises(ConfigError, match="`t`"):
        merge_tensors("slerp", [rand(3, seed=1)], base=rand(3, seed=2))


def test_slerp_output_dtype_is_rounded_from_fp32():
    base, model = rand(16, 8, seed=4), rand(16, 8, seed=5)
    out = merge_tensors("slerp", [model], base=base, t=0.4, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, merge_tensors("slerp", [model], base=base, t=0.4).to(torch.bfloat16))


def nuslerp_formula(t, v0, v1, dim):
    """Slerp of every fibre along `dim` (None: the whole tensor), written fibre by fibre."""
    if dim is None:
        return slerp_rows(t, v0.reshape(1, -1), v1.reshape(1, -1)).reshape(v0.shape)
    a, b = v0.movedim(dim, -1), v1.movedim(dim, -1)
    rows = slerp_rows(t, a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
    return rows.reshape(a.shape).movedim(-1, dim)


def slerp_rows(t, a, b):
    out = []
    for x, y in zip(a.double(), b.double()):
        cos = float(x @ y / (x.norm() * y.norm()))
        theta = math.acos(max(-1.0, min(1.0, cos)))
        out.append((math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta))
    return torch.stack(out)


@pytest.mark.parametrize(
    "options,dim",
    [({}, None), ({"nuslerp_flatten": False}, -1), ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, 0)],
)
def test_nuslerp_modes(options, dim):
    x0, x1 = rand(5, 9, seed=6), rand(5, 9, seed=7)
    out = merge_tensors("nuslerp", [x0, x1], weight=[1.0, 3.0], **options)
    close(out, nuslerp_formula(0.75, x0, x1, dim))


def test_nuslerp_with_base_slerps_task_vectors():
    base, x0, x1 = rand(4, 6, seed=8), rand(4, 6, seed=9), rand(4, 6, seed=10)
    out = merge_tensors("nuslerp", [x0, x1], base=base, weight=[2.0, 2.0], nuslerp_flatten=False)
    expected = base.double() + nuslerp_formula(0.5, x0 - base, x1 - base, -1)
    close(out, expected)


def test_nuslerp_zero_weight_sum_means_halfway():
    x0, x1 = rand(10, seed=11), rand(10, seed=12)
    close(merge_tensors("nuslerp", [x0, x1], weight=[1.0, -1.0]), nuslerp_formula(0.5, x0, x1, None))


def test_nuslerp_needs_weights_and_two_models():
    with pytest.raises(ConfigError, match="weight"):
        merge_tensors("nuslerp", [rand(3, seed=1), rand(3, seed=2)])
    with pytest.raises(ConfigError, match="exactly 2"):
        merge_tensors("nuslerp", [rand(3, seed=1)] * 3, weight=1.0)


def multislerp_tangent_formula(vectors, weights, base=None, eps=1e-12):
    """mergekit's description: project unit vectors to the tangent space at their weighted mean,
    average there, map back with the exponential map (whose norm has eps added), restore the
    weighted mean norm (fp64)."""
    vs = [(v - base if base is not None else v).double().flatten() for v in vectors]
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    units = [v / (v.norm() + eps) for v in vs]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    tn = tangent.norm() + eps
    point = mean * torch.cos(tn) + tangent * torch.sin(tn) / tn
    out = point * sum(wi * v.norm() for wi, v in zip(w, vs))
    out = out.reshape(vectors[0].shape)
    return out + base.double() if base is not None else out


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_matches_tangent_space_formula(with_base):
    xs = [rand(7, 5, seed=s) for s in (13, 14, 15)]
    base = rand(7, 5, seed=16) if with_base else None
    out = merge_tensors("multislerp", xs, base=base, weight=[0.5, 1.0, 2.0])
    close(out, multislerp_tangent_formula(xs, [0.5, 1.0, 2.0], base))


def test_multislerp_keeps_eps_where_mergekit_adds_it():
    """eps joins each norm and the exponential map's tangent norm, so a large one shrinks the
    result by cos(eps): 0.5% at eps 0.1, which a formula without it misses."""
    xs = [rand(7, 5, seed=s) for s in (13, 14, 15)]
    out = merge_tensors("multislerp", xs, weight=[0.5, 1.0, 2.0], eps=0.1)
    close(out, multislerp_tangent_formula(xs, [0.5, 1.0, 2.0], eps=0.1))
    assert not torch.allclose(out.double(), multislerp_tangent_formula(xs, [0.5, 1.0, 2.0]), rtol=1e-3)


def test_multislerp_antipodal_pair_falls_back_to_linear_and_three_raise():
    x = rand(8, seed=17)
    assert torch.equal(merge_tensors("multislerp", [x, -x], weight=[1.0, 1.0]), torch.zeros(8))
    with pytest.raises(ConfigError, match="different weights"):
        merge_tensors("multislerp", [x, -x, x, -x], weight=1.0)


GRADIENT_SLERP = """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
      - model: {ft1}
        layer_range: [0, 3]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_gradient_slerp_config_end_to_end(tiny_models, tmp_path):
    config = tmp_path / "slerp.yml"
    config.write_text(GRADIENT_SLERP.format(base=tiny_models["base"], ft1=tiny_models["ft1"]))
    first = run(config, tmp_path / "out1", quiet=True).output_dir
    second = run(config, tmp_path / "out2", quiet=True).output_dir
    merged, again = load_dir(first), load_dir(second)
    base, model = load_dir(tiny_models["base"]), load_dir(tiny_models["ft1"])
    assert all(torch.equal(merged[k], again[k]) for k in merged)  # byte-reproducible
    # Layer 1 of 3 sits at depth 0.5: the 5-point gradients give 0.3 (attention) and 0.7 (mlp).
    for name, t in [
        ("model.layers.1.self_attn.q_proj.weight", 0.3),
        ("model.layers.1.mlp.up_proj.weight", 0.7),
        ("model.layers.2.self_attn.o_proj.weight", 1.0),
        ("model.layers.0.mlp.down_proj.weight", 1.0),
        ("model.layers.1.input_layernorm.weight", 0.5),
        ("model.embed_tokens.weight", 0.5),
    ]:
        expected = slerp_formula(t, base[name].float(), model[name].float())
        assert merged[name].dtype == torch.bfloat16
        # fp32 arithmetic, one bf16 rounding: within one bf16 ulp of the exact formula.
        ulp = expected.abs() * 2.0**-7 + 1e-6 * expected.abs().max()
        assert ((merged[name].double() - expected).abs() <= ulp).all(), name


def test_config_errors_name_the_parameter_and_write_nothing(tiny_models, tmp_path):
    no_t = write_config(tmp_path / "no_t.yml", {
        "merge_method": "slerp", "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models["base"])}, {"model": str(tiny_models["ft1"])}],
    })
    with pytest.raises(ConfigError, match="`t`"):
        run(no_t, tmp_path / "out", quiet=True)
    no_weight = write_config(tmp_path / "no_weight.yml", {
        "merge_method": "nuslerp",
        "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0}}, {"model": str(tiny_models["ft2"])}],
    })
    with pytest.raises(ConfigError, match="weight.*ft2"):
        run(no_weight, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
