"""The TIES family checked against independent formulas written here.

Each expected value follows METHODS.md step by step: the kept mask of every model is computed by
sorting (not by the histogram selection the library uses), then the DESIGN.md arithmetic
(fp32 fused multiply-adds in config order, one rounding into the output dtype), so results must
match bit for bit. Random sparsifiers draw from the documented Philox stream
(`derive_key(seed, tensor name, model index)`, counter = flat index).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastmerge
from _support import TINY, fma_f32, load_dir, write_config
from fastmerge.demo import fine_tune_of, make_state, write_checkpoint
from fastmerge.errors import ConfigError, FastmergeError
from fastmerge.ops.random import derive_key, philox_uniform

NAME = "model.layers.1.mlp.up_proj.weight"
SHAPE = (24, 40)


def random_models(count: int, seed: int = 0, shape=SHAPE):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(count)]


# ---------------------------------------------------------------- independent masks

def top_k_mask(d: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[torch.argsort(d.abs().reshape(-1), descending=True, stable=True)[:k]] = True
    return keep


def magnitude_mask(d, density):
    n = d.numel()
    if density >= 1:
        return torch.ones(n, dtype=torch.bool)
    return top_k_mask(d, 0 if density <= 0 else max(1, int(density * n)))


def breadcrumbs_mask(d, density, gamma):
    """Sort ascending; drop the bottom n - int(density n) - int(gamma n), keep the next int(density n)."""
    n = d.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.argsort(d.abs().reshape(-1), stable=True)[bottom:bottom + target]] = True
    return keep


def philox_draws(seed, name, i, n):
    return torch.from_numpy(philox_uniform(derive_key(seed, name, i), 0, n))


def dare_mask(d, density, seed, name, i):
    return philox_draws(seed, name, i, d.numel()) < density


def della_mask(d, density, epsilon, seed, name, i):
    """Rank |d| along dim 1 as mergekit (ascending, 0-based; 0/1-dim tensors are one row); keep
    where u < (density - eps) + 2 eps rank / (len - 1); density <= 0 keeps nothing."""
    if density <= 0:
        return torch.zeros(d.numel(), dtype=torch.bool)
    a = d.abs().reshape(1, -1) if d.dim() < 2 else d.abs()
    rank = torch.argsort(torch.argsort(a.movedim(1, -1), dim=-1, stable=True), dim=-1).movedim(-1, 1).double()
    p = ((density - epsilon) + 2 * epsilon * rank / (a.shape[1] - 1)).float().reshape(-1)
    return philox_draws(seed, name, i, d.numel()) < p


# ---------------------------------------------------------------- independent merge

def l1(v: torch.Tensor) -> float:
    """fp64 sum of |v| in index order (the library's lane order for tensors under 65536 elements)."""
    return float(np.cumsum(np.abs(v.double().numpy()))[-1]) if v.numel() else 0.0


def expected_merge(base, xs, weights, masks, consensus, normalize, lam=1.0, rescale=False):
    b = base.reshape(-1).float()
    deltas = []
    for x, keep in zip(xs, masks):
        d = x.reshape(-1).float() - b
        kept = torch.where(keep, d, torch.zeros_like(d))
        # mergekit rescales only when both L1 sums are at least 1e-7.
        scale = np.float32(l1(d) / l1(kept)) if rescale and min(l1(d), l1(kept)) >= 1e-7 else np.float32(1)
        deltas.append(torch.where(keep, d * torch.tensor(scale), torch.zeros_like(d)))
    w32 = [torch.tensor(w, dtype=torch.float32) for w in weights]
    elect = torch.zeros_like(b)
    for w, d in zip(w32, deltas):
        elect = fma_f32(w, d, elect)
    if consensus:
        mixed, div = torch.zeros_like(b), torch.zeros_like(b)
        for w, d in zip(w32, deltas):
            counted = (torch.sign(w) * torch.sign(d)) == torch.where(elect >= 0, 1.0, -1.0)
            mixed = torch.where(counted, fma_f32(w, d, mixed), mixed)
            div = torch.where(counted, div + w, div)
    else:
        mixed = elect
        total = np.float32(0)
        for w in weights:
            total = np.float32(total + np.float32(w))
        div = torch.full_like(b, 1.0 if abs(total) < np.float32(1e-8) else float(total))  # mergekit's cut-off
    if normalize:
        mixed = mixed / torch.where(div == 0, torch.ones_like(div), div)
    return fma_f32(torch.tensor(lam, dtype=torch.float32), mixed, b).reshape(base.shape)


def deltas_of(base, xs):
    return [(x - base).reshape(-1) for x in xs]


# ---------------------------------------------------------------- per-method formulas

WEIGHTS = [0.7, -0.2, 0.5]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("density", [0.3, 0.001, 0.0, 1.0])
def test_ties_matches_formula(normalize, density):
    base, xs = random_models(3)
    masks = [magnitude_mask(d, density) for d in deltas_of(base, xs)]
    out = fastmerge.merge_tensors("ties", xs, base=base, name=NAME, weight=WEIGHTS, density=density,
                                  normalize=normalize, lambda_=0.9)
    assert torch.equal(out, expected_merge(base, xs, WEIGHTS, masks, True, normalize, lam=0.9))


def test_ties_defaults_normalize_and_keeps_at_least_one_element():
    base, xs = random_models(2)
    out = fastmerge.merge_tensors("ties", xs, base=base, name=NAME, weight=[1.0, 1.0], density=1e-6)
    assert int((out != base).sum()) <= 2 and int((out != base).sum()) >= 1
    masks = [magnitude_mask(d, 1e-6) for d in deltas_of(base, xs)]
    assert torch.equal(out, expected_merge(base, xs, [1.0, 1.0], masks, True, True))


@pytest.mark.parametrize("method, consensus", [("dare_ties", True), ("dare_linear", False)])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_matches_formula(method, consensus, rescale):
    base, xs = random_models(3)
    densities = [0.5, 0.3, 0.9]
    masks = [dare_mask(d, p, 7, NAME, i) for i, (d, p) in enumerate(zip(deltas_of(base, xs), densities))]
    out = fastmerge.merge_tensors(method, xs, base=base, name=NAME, seed=7, weight=WEIGHTS, density=densities, rescale=rescale)
    assert torch.equal(out, expected_merge(base, xs, WEIGHTS, masks, consensus, False, rescale=rescale))


def test_dare_keeps_about_density_and_depends_on_seed_only():
    base, xs = random_models(1, shape=(200, 100))
    kept = lambda seed: fastmerge.merge_tensors("dare_linear", xs, base=base, name=NAME, seed=seed, weight=1.0, density=0.25, rescale=False) != base  # noqa: E731
    assert abs(float(kept(3).float().mean()) - 0.25) < 0.01
    assert torch.equal(kept(3), kept(3))
    assert not torch.equal(kept(3), kept(4))


@pytest.mark.parametrize("method, consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs_matches_formula(method, consensus):
    base, xs = random_models(3)
    masks = [breadcrumbs_mask(d, 0.4, 0.05) for d in deltas_of(base, xs)]
    out = fastmerge.merge_tensors(method, xs, base=base, name=NAME, weight=WEIGHTS, density=0.4, gamma=0.05)
    assert torch.equal(out, expected_merge(base, xs, WEIGHTS, masks, consensus, False))


def test_breadcrumbs_default_gamma_is_one_percent():
    base, xs = random_models(2)
    out = fastmerge.merge_tensors("breadcrumbs", xs, base=base, name=NAME, weight=[0.5, 0.5], density=0.5)
    masks = [breadcrumbs_mask(d, 0.5, 0.01) for d in deltas_of(base, xs)]
    assert torch.equal(out, expected_merge(base, xs, [0.5, 0.5], masks, False, False))


@pytest.mark.parametrize("method, consensus, normalize", [("della", True, True), ("della_linear", False, False)])
def test_della_matches_formula(method, consensus, normalize):
    base, xs = random_models(3)
    masks = [della_mask(d.reshape(SHAPE), 0.5, 0.2, 11, NAME, i) for i, d in enumerate(deltas_of(base, xs))]
    out = fastmerge.merge_tensors(method, xs, base=base, name=NAME, seed=11, weight=WEIGHTS, density=0.5, epsilon=0.2)
    assert torch.equal(out, expected_merge(base, xs, WEIGHTS, masks, consensus, normalize, rescale=True))


def test_della_rejects_density_epsilon_outside_unit_interval():
    base, xs = random_models(2)
    with pytest.raises(FastmergeError, match="epsilon"):
        fastmerge.merge_tensors("della", xs, base=base, name=NAME, weight=1.0, density=0.1)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs", "della_linear"])
@pytest.mark.parametrize("density", [1.5, -0.1, True])
def test_the_tensor_level_api_refuses_a_density_outside_zero_to_one(method, density):
    """As a config does at plan time: mergekit's clamp would keep all of a task vector at 1.5."""
    base, xs = random_models(2)
    message = "must be a number, got True" if density is True else \
        f"is {density!r} for tensor {NAME}; it must be a number from 0 to 1"
    with pytest.raises(ConfigError, match=f"`density` of model 1 {message}"):
        fastmerge.merge_tensors(method, xs, base=base, name=NAME, weight=1.0, density=[0.5, density])


def expected_sce(base, xs, select_topk):
    b = base.reshape(-1).float()
    deltas = torch.stack([x.reshape(-1).float() - b for x in xs])
    if select_topk < 1:
        variance = deltas.var(dim=0, unbiased=False)
        k = int(int((variance != 0).sum()) * select_topk)
        keep = torch.zeros_like(b, dtype=torch.bool)
        keep[torch.argsort(variance, descending=True, stable=True)[:k]] = True
        deltas = deltas * keep
    mean_sq = deltas.double().square().mean(dim=1)
    weights = (mean_sq / mean_sq.sum()).float()
    elect = torch.zeros_like(b)
    for d in deltas:
        elect = elect + d
    mixed, div = torch.zeros_like(b), torch.zeros_like(b)
    for w, d in zip(weights, deltas):
        counted = torch.sign(d) == torch.where(elect >= 0, 1.0, -1.0)
        mixed = torch.where(counted, fma_f32(w, d, mixed), mixed)
        div = torch.where(counted, div + w, div)
    return (b + mixed / div.clamp(min=1e-6)).reshape(base.shape)


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_matches_formula(select_topk):
    base, xs = random_models(3)
    out = fastmerge.merge_tensors("sce", xs, base=base, name=NAME, select_topk=select_topk)
    assert torch.equal(out, expected_sce(base, xs, select_topk))


def test_sce_takes_no_weights():
    base, xs = random_models(2)
    with pytest.raises(ConfigError, match="weight"):
        fastmerge.merge_tensors("sce", xs, base=base, weight=1.0)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_reference_and_native_backends_give_the_same_bytes(method):
    base, xs = random_models(3)
    params = dict(weight=WEIGHTS, density=0.4, seed=5, name=NAME)
    if method == "della":
        params["epsilon"] = 0.1
    native = fastmerge.merge_tensors(method, xs, base=base, backend=None, **params)
    reference = fastmerge.merge_tensors(method, xs, base=base, backend="reference", **params)
    assert torch.equal(native, reference)


def test_breadcrumbs_per_model_gamma_and_edge_cases_match_mergekit():
    """gamma per model; density 1 keeps the whole task vector; density + gamma > 1 drops fewer
    outliers so int(density n) survive."""
    base, xs = random_models(3)
    densities, gammas = [0.4, 0.97, 1.0], [0.05, 0.1, 0.2]
    masks = [breadcrumbs_mask(d, p, g) if p < 1 else torch.ones(d.numel(), dtype=torch.bool)
             for d, p, g in zip(deltas_of(base, xs), densities, gammas)]
    assert int(masks[1].sum()) == int(0.97 * xs[1].numel())
    out = fastmerge.merge_tensors("breadcrumbs_ties", xs, base=base, name=NAME, weight=WEIGHTS, density=densities,
                                  gamma=gammas)
    assert torch.equal(out, expected_merge(base, xs, WEIGHTS, masks, True, False))


def test_della_per_model_epsilon_zero_density_and_3d_tensors():
    shape = (4, 6, 5)
    base, xs = random_models(3, shape=shape)
    densities, epsilons = [0.5, 0.0, 0.4], [0.2, 0.15, 0.3]
    masks = [della_mask(d.reshape(shape), p, e, 11, NAME, i)
             for i, (d, p, e) in enumerate(zip(deltas_of(base, xs), densities, epsilons))]
    out = fastmerge.merge_tensors("della", xs, base=base, name=NAME, seed=11, weight=WEIGHTS, density=densities,
                                  epsilon=epsilons)
    assert torch.equal(out, expected_merge(base, xs, WEIGHTS, masks, True, True, rescale=True))


def test_tiny_task_vectors_are_not_rescaled_and_tiny_weight_sums_divide_by_one():
    base, xs = random_models(2)
    xs = [base + (x - base) * 1e-10 for x in xs]  # sum |d| ~ 1e-8 < 1e-7
    weights = [3e-9, 4e-9]
    masks = [dare_mask(d, 0.5, 2, NAME, i) for i, d in enumerate(deltas_of(base, xs))]
    out = fastmerge.merge_tensors("dare_linear", xs, base=base, name=NAME, seed=2, weight=weights, density=0.5,
                                  normalize=True)
    assert torch.equal(out, expected_merge(base, xs, weights, masks, False, True, rescale=True))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
@pytest.mark.parametrize("scope", ["model", "layer"])
def test_tensor_level_api_refuses_other_trim_scopes(method, scope):
    base, xs = random_models(2)
    with pytest.raises(ConfigError, match="trim_scope"):
        fastmerge.merge_tensors(method, xs, base=base, weight=1.0, density=0.5, trim_scope=scope)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_sparsifiers_refuse_a_model_wide_threshold(method, tiny_models, tmp_path):
    config = {
        "merge_method": method,
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}}],
        "parameters": {"trim_scope": "model"},
    }
    with pytest.raises(ConfigError, match="at random.*trim_scope: model"):
        fastmerge.run(write_config(tmp_path / "m.yml", config), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- configs on checkpoints

def gradient(values: list[float], t: float) -> float:
    """Piecewise-linear interpolation of a gradient list at t in [0, 1]."""
    position = t * (len(values) - 1)
    low = min(int(position), len(values) - 2)
    return values[low] + (values[low + 1] - values[low]) * (position - low)


def layer_t(name: str) -> float:
    parts = name.split(".")
    return int(parts[2]) / (TINY.num_hidden_layers - 1) if parts[1] == "layers" else 0.0


def test_ties_config_with_gradients_and_filters(tiny_models, tmp_path):
    """mergekit's ties example style: density gradient on one model, filters on another, on
    sharded bf16 checkpoints."""
    config = {
        "merge_method": "ties",
        "base_model": str(tiny_models["base"]),
        "models": [
            {"model": str(tiny_models["base"])},
            {"model": str(tiny_models["ft1"]), "parameters": {"density": [1.0, 0.7, 0.1], "weight": 1.0}},
            {"model": str(tiny_models["ft2"]), "parameters": {
                "density": 0.5, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.3}]}},
        ],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "bfloat16",
    }
    fastmerge.run(write_config(tmp_path / "ties.yml", config), tmp_path / "out", quiet=True)
    merged, base = load_dir(tmp_path / "out"), load_dir(tiny_models["base"])
    fts = [load_dir(tiny_models["ft1"]), load_dir(tiny_models["ft2"])]
    for name, b in base.items():
        xs = [ft[name] for ft in fts]
        densities = [gradient([1.0, 0.7, 0.1], layer_t(name)), 0.5]
        weights = [1.0, 0.5 if "mlp" in name else 0.3]
        masks = [magnitude_mask(x.float() - b.float(), p) for x, p in zip(xs, densities)]
        expected = expected_merge(b, xs, weights, masks, True, True).to(torch.bfloat16)
        assert torch.equal(merged[name].view(torch.int16), expected.view(torch.int16)), name


@pytest.mark.parametrize("method, extra", [
    ("dare_ties", {"density": 0.5}), ("della_linear", {"density": 0.5, "epsilon": 0.1}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.02}), ("sce", None),
])
def test_configs_run_and_are_byte_reproducible(tiny_models, tmp_path, method, extra):
    models = [{"model": str(tiny_models[n])} | ({"parameters": {"weight": 0.5} | extra} if extra else {}) for n in ("ft1", "ft2", "ft3")]
    config = write_config(tmp_path / "c.yml", {"merge_method": method, "base_model": str(tiny_models["base"]),
                                               "models": models, "dtype": "bfloat16"})
    for out in ("a", "b"):
        fastmerge.run(config, tmp_path / out, seed=3, quiet=True, out_shard_size="30K")
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert all(torch.equal(a[n].view(torch.int16), b[n].view(torch.int16)) for n in a)
    assert any(not torch.equal(a[n], load_dir(tiny_models["base"])[n]) for n in a)


@pytest.mark.parametrize("method, params, whole_mask, normalize", [
    ("ties", {"density": 0.2}, lambda d: top_k_mask(d, int(0.2 * d.numel())), True),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.05}, lambda d: breadcrumbs_mask(d, 0.3, 0.05), False),
    ("breadcrumbs", {"density": 0.98, "gamma": 0.05}, lambda d: breadcrumbs_mask(d, 0.98, 0.05), False),
])
def test_model_wide_threshold_trims_the_whole_task_vector(tmp_path, method, params, whole_mask, normalize):
    """fp32 checkpoints, so no two task-vector elements tie and the selection is unambiguous:
    the mask is the per-tensor formula applied to each model's concatenated task vector."""
    state = make_state(TINY, seed=0)
    paths = [write_checkpoint(tmp_path / "base", state, TINY, torch.float32, max_shard_bytes=20_000)]
    paths += [write_checkpoint(tmp_path / f"ft{i}", fine_tune_of(state, seed=i, scale=0.05), TINY, torch.float32,
                               max_shard_bytes=20_000) for i in (1, 2)]
    config = {
        "merge_method": method,
        "base_model": str(paths[0]),
        "models": [{"model": str(p), "parameters": {"weight": 1.0} | params} for p in paths[1:]],
        "parameters": {"trim_scope": "model"},
    }
    fastmerge.run(write_config(tmp_path / "m.yml", config), tmp_path / "out", quiet=True)
    merged, base = load_dir(tmp_path / "out"), load_dir(paths[0])
    fts = [load_dir(p) for p in paths[1:]]
    names = list(base)
    masks = []
    for ft in fts:  # one selection over the concatenated task vector of the model
        whole = torch.cat([(ft[n].float() - base[n].float()).reshape(-1) for n in names])
        keep = whole_mask(whole)
        masks.append(dict(zip(names, keep.split([base[n].numel() for n in names]))))
    for name in names:
        xs = [ft[name] for ft in fts]
        expected = expected_merge(base[name], xs, [1.0, 1.0], [m[name] for m in masks], method != "breadcrumbs",
                                  normalize)
        assert torch.equal(merged[name], expected), name


def test_model_wide_threshold_needs_one_density_per_model(tiny_models, tmp_path):
    config = {
        "merge_method": "ties",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0, "density": [0.2, 0.4]}}],
        "parameters": {"trim_scope": "model"},
    }
    with pytest.raises(ConfigError, match="one density per model"):
        fastmerge.run(write_config(tmp_path / "m.yml", config), tmp_path / "out", quiet=True)
    config |= {"merge_method": "breadcrumbs", "models": [{"model": str(tiny_models["ft1"]), "parameters": {
        "weight": 1.0, "density": 0.5, "gamma": [{"filter": "mlp", "value": 0.02}, {"value": 0.01}]}}]}
    with pytest.raises(ConfigError, match="one density and one gamma per model.*gamma"):
        fastmerge.run(write_config(tmp_path / "b.yml", config), tmp_path / "out", quiet=True)
