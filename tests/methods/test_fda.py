"""FDA against its definitions written here independently: the anchors' cosine objective (autograd),
its optimum (singular values), the least-squares fit (normal equations in the input space), and
what a merge must give when the anchors see everything a task changed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from _support import load_dir, write_config
from fastmerge import merge_tensors, run
from fastmerge.errors import ConfigError
from fastmerge.methods import fda
from fastmerge.methods.fda import alignment_gradient, fit_to_anchors, initial_anchors, optimise_anchors


def rand(*shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def cosine(anchors, delta):
    """cos(<delta X^T X, delta>) as the method defines it, formed in full (fp64)."""
    moved = delta.double() @ anchors.double().T @ anchors.double()
    return float((moved * delta.double()).sum() / (moved.norm() * delta.double().norm()))


def low_rank(rows, cols, rank, seed, scale=0.01):
    return rand(rows, rank, seed=seed) @ rand(rank, cols, seed=seed + 1) * scale


def task_arithmetic(base, models, weights, lam):
    return base.double() + lam * sum(w * (m.double() - base.double()) for w, m in zip(weights, models))


def test_the_gradient_is_the_gradient_of_the_cosine():
    delta = rand(37, 29, seed=1, dtype=torch.float64)
    anchors = rand(6, 29, seed=2, dtype=torch.float64).requires_grad_(True)
    moved = delta @ anchors.T @ anchors
    ((moved * delta).sum() / (moved.norm() * delta.norm())).backward()
    ours = alignment_gradient(anchors.detach(), delta, delta.norm())
    torch.testing.assert_close(ours, anchors.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("init", ["weight", "gaussian"])
def test_optimised_anchors_reach_the_top_singular_subspace(init):
    """The cosine is at most ||top-n singular values|| / ||all||; Adam gets there from either start."""
    base = rand(64, 48, seed=3) * 0.02
    delta = low_rank(64, 48, 12, seed=4) + rand(64, 48, seed=5) * 1e-4
    start = initial_anchors(base + delta, 6, init, 0.01, seed=7)
    anchors = optimise_anchors(start, delta, steps=300, lr=0.05)
    singular = torch.linalg.svdvals(delta.double())
    bound = float(singular[:6].norm() / singular.norm())
    assert cosine(start, delta) < bound - 0.05
    assert bound - 0.01 < cosine(anchors, delta) <= bound + 1e-6


def test_weight_init_samples_distinct_rows_of_the_fine_tune_and_is_seeded():
    finetuned = rand(10, 4, seed=8)
    anchors = initial_anchors(finetuned, 6, "weight", 0.01, seed=1)
    rows = {tuple(r.tolist()) for r in anchors}
    assert len(rows) == 6 and rows <= {tuple(r.tolist()) for r in finetuned}
    assert torch.equal(anchors, initial_anchors(finetuned, 6, "weight", 0.01, seed=1))
    assert not torch.equal(anchors, initial_anchors(finetuned, 6, "weight", 0.01, seed=2))
    assert initial_anchors(finetuned, 25, "weight", 0.01, seed=1).shape == (25, 4)
    noise = initial_anchors(finetuned, 4000, "gaussian", 0.01, seed=1)
    assert abs(float(noise.std()) - 0.01) < 5e-4


@pytest.mark.parametrize("block_rows", [1024, 7])
@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_the_fit_solves_the_weighted_least_squares_problem(ridge, block_rows, monkeypatch):
    """Normal equations in the input space: (W - W0)(sum_i w_i/n X_i^T X_i + rho I) =
    sum_i w_i/n (x_i - W0) X_i^T X_i, rho = ridge * mean_j (w_i/n) ||anchor_j||^2; the same
    when the fit forms the matrix a few rows at a time."""
    monkeypatch.setattr(fda, "FIT_ROWS", block_rows)
    start = rand(20, 15, seed=9, dtype=torch.float64)
    models = [rand(20, 15, seed=10 + i) for i in range(3)]
    anchors = [rand(4, 15, seed=20 + i) for i in range(3)]
    weights = [1.0, 0.5, 2.0]
    n = 4
    gram = sum(w / n * X.double().T @ X.double() for w, X in zip(weights, anchors))
    rhs = sum(w / n * (x.double() - start) @ X.double().T @ X.double() for w, x, X in zip(weights, models, anchors))
    rho = ridge * sum(w / n * float(X.double().pow(2).sum()) for w, X in zip(weights, anchors)) / (3 * n)
    expected = start + torch.linalg.lstsq((gram + rho * torch.eye(15, dtype=torch.float64)).T, rhs.T).solution.T
    if ridge == 0:  # 12 anchors in 15 dimensions: the minimum-change solution is the one asked for
        expected = start + rhs @ torch.linalg.pinv(gram)
    torch.testing.assert_close(fit_to_anchors(start, models, anchors, weights, ridge), expected, rtol=1e-9, atol=1e-10)


def test_a_zero_weight_model_is_left_out_of_the_fit():
    start = rand(6, 5, seed=30, dtype=torch.float64)
    models, anchors = [rand(6, 5, seed=31), rand(6, 5, seed=32)], [rand(2, 5, seed=33), rand(2, 5, seed=34)]
    torch.testing.assert_close(fit_to_anchors(start, models, anchors, [1.0, 0.0], 0.01),
                               fit_to_anchors(start, models[:1], anchors[:1], [1.0], 0.01))
    assert torch.equal(fit_to_anchors(start, models, anchors, [0.0, 0.0], 0.01), start)


@pytest.mark.parametrize("init_merge", ["task_arithmetic", "base"])
def test_tasks_on_separate_inputs_are_each_reproduced_whatever_lambda(init_merge):
    """Two low-rank task vectors acting on disjoint input columns, from a zero base so that the
    starting anchors (rows of the fine-tunes; `steps: 0` keeps them, as Adam's per-coordinate
    steps would not) span exactly each task's inputs: the fit restores b + d1 + d2, where task
    arithmetic gives b + lambda (d1 + d2)."""
    base = torch.zeros(40, 32)
    d1, d2 = torch.zeros(40, 32), torch.zeros(40, 32)
    d1[:, :16] = low_rank(40, 16, 3, seed=41)
    d2[:, 16:] = low_rank(40, 16, 3, seed=43)
    models = [base + d1, base + d2]
    merged = merge_tensors("fda", models, base, name="layers.0.mlp.up_proj.weight", out_dtype=torch.float32,
                           anchors=8, steps=0, ridge=0.0, lambda_=0.3, init_merge=init_merge)
    torch.testing.assert_close(merged, base + d1 + d2, rtol=0, atol=2e-6)
    assert (task_arithmetic(base, models, [1, 1], 0.3).float() - (base + d1 + d2)).abs().max() > 1e-3


def test_one_fine_tune_with_enough_anchors_is_returned():
    """Anchors spanning the task vector's rows (zero base, no steps, as above) recover the fine-tune."""
    base = torch.zeros(30, 20)
    finetuned = base + low_rank(30, 20, 4, seed=51)
    merged = merge_tensors("fda", [finetuned], base, name="layers.3.self_attn.o_proj.weight",
                           out_dtype=torch.float32, anchors=6, steps=0, ridge=0.0, lambda_=0.5)
    torch.testing.assert_close(merged, finetuned, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name, shape", [
    ("model.norm.weight", (24,)),
    ("model.embed_tokens.weight", (50, 24)),
    ("layers.0.mlp.up_proj.bias", (24,)),
    ("scalar", ()),
    ("layers.0.mlp.up_proj.weight", (0, 24)),
])
def test_tensors_without_anchors_take_task_arithmetic(name, shape):
    base = rand(*shape, seed=60)
    models = [base + rand(*shape, seed=61 + i) * 0.01 for i in range(3)]
    merged = merge_tensors("fda", models, base, name=name, out_dtype=torch.float32, weight=[1.0, 0.5, 0.25], lambda_=0.7)
    expected = task_arithmetic(base, models, [1.0, 0.5, 0.25], 0.7).float()
    assert merged.shape == torch.Size(shape)
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtypes_round_the_fp32_merge_to_nearest_even(in_dtype, out_dtype):
    base = (rand(33, 17, seed=70) * 0.02).to(in_dtype)
    models = [(base.float() + low_rank(33, 17, 2, seed=71 + 2 * i)).to(in_dtype) for i in range(2)]
    wide = merge_tensors("fda", models, base, name="w.weight", out_dtype=torch.float32, anchors=5)
    merged = merge_tensors("fda", models, base, name="w.weight", out_dtype=out_dtype, anchors=5)
    assert merged.dtype == out_dtype and merged.shape == base.shape
    assert torch.equal(merged, wide.to(out_dtype))


def test_inputs_are_left_as_they_were():
    base = rand(16, 12, seed=85) * 0.02
    models = [base + rand(16, 12, seed=86 + i) * 1e-3 for i in range(2)]
    copies = [m.clone() for m in [base, *models]]
    merge_tensors("fda", models, base, name="w.weight", out_dtype=torch.float32, anchors=3, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(copies, [base, *models]))


def test_the_seed_picks_the_anchors():
    base = rand(48, 40, seed=80) * 0.02
    models = [base + rand(48, 40, seed=81 + i) * 0.002 for i in range(2)]
    kwargs = dict(name="w.weight", out_dtype=torch.float32, anchors=4, steps=5)
    first = merge_tensors("fda", models, base, seed=1, **kwargs)
    assert torch.equal(first, merge_tensors("fda", models, base, seed=1, **kwargs))
    assert not torch.equal(first, merge_tensors("fda", models, base, seed=2, **kwargs))


def test_the_bytes_do_not_depend_on_the_thread_count():
    """Odd shapes and few anchors, where MKL's products otherwise vary with the thread count."""
    script = textwrap.dedent("""
        import hashlib, sys, torch
        from fastmerge import merge_tensors
        torch.set_num_threads(int(sys.argv[1]))
        g = torch.Generator().manual_seed(0)
        digest = hashlib.sha256()
        for shape, count in (((333, 77), 5), ((97, 1000), 7)):
            base = torch.randn(*shape, generator=g) * 0.02
            models = [base + torch.randn(*shape, generator=g) * 1e-3 for _ in range(3)]
            merged = merge_tensors("fda", models, base, name="w.weight", out_dtype=torch.float32, anchors=count, steps=30)
            digest.update(merged.numpy().tobytes())
        print(digest.hexdigest())
    """)
    digests = {subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True, check=True).stdout
               for n in (1, 2, 3)}
    assert len(digests) == 1


@pytest.mark.parametrize("param, value, message", [
    ("anchor_init", "rows", "`anchor_init`.*weight, gaussian"),
    ("init_merge", "ties", "`init_merge`.*task_arithmetic, base"),
    ("anchors", 0, "`anchors`.*integer >= 1"),
    ("anchors", 2.5, "`anchors`.*integer"),
    ("steps", -1, "`steps`.*integer >= 0"),
    ("lr", 0.0, "`lr`.*> 0"),
    ("sigma", -0.1, "`sigma`.*> 0"),
    ("ridge", -1.0, "`ridge`.*>= 0"),
    ("ridge", float("nan"), "`ridge`"),
    ("weight", -1.0, "`weight`.*>= 0"),
])
def test_bad_parameters_name_the_parameter_and_the_tensor(param, value, message):
    base = rand(8, 6, seed=90)
    with pytest.raises(ConfigError, match=message) as raised:
        merge_tensors("fda", [base + 1e-3, base - 1e-3], base, name="layers.1.w.weight", **{param: value})
    assert "layers.1.w.weight" in str(raised.value)


def test_a_config_merge_of_checkpoints(tiny_models, tmp_path):
    config = write_config(tmp_path / "fda.yml", {
        "merge_method": "fda",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models[f"ft{i}"]), "parameters": {"weight": 1.0}} for i in (1, 2, 3)],
        "parameters": {"anchors": 4, "steps": 20, "lambda": 0.5},
        "dtype": "float32",
    })
    run(config, tmp_path / "out")
    merged, base = load_dir(tmp_path / "out"), load_dir(tiny_models["base"])
    models = [load_dir(tiny_models[f"ft{i}"]) for i in (1, 2, 3)]
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        arithmetic = task_arithmetic(base[name], [m[name] for m in models], [1, 1, 1], 0.5).float()
        if tensor.dim() == 2 and "embed" not in name:
            assert not torch.allclose(tensor, arithmetic)
        else:
            torch.testing.assert_close(tensor, arithmetic, rtol=1e-6, atol=1e-7)
    run(config, tmp_path / "again")
    assert all(torch.equal(t, load_dir(tmp_path / "again")[n]) for n, t in merged.items())


def test_a_bad_parameter_stops_a_config_merge_before_anything_is_written(tiny_models, tmp_path):
    config = write_config(tmp_path / "fda.yml", {
        "merge_method": "fda",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models["ft1"])}],
        "parameters": {"anchor_init": [{"filter": "norm", "value": "rows"}, {"value": "weight"}]},
    })
    with pytest.raises(ConfigError, match="`anchor_init` for tensor .*norm"):
        run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_merge_stays_on_the_device_and_agrees_with_the_cpu():
    """Same anchors to start (drawn on the CPU); cuBLAS and MKL round differently, so the
    results agree to a small fraction of the change the merge makes, not bit for bit."""
    base = rand(300, 200, seed=95) * 0.02
    models = [(base + low_rank(300, 200, 6, seed=96 + 2 * i)).bfloat16() for i in range(3)]
    kwargs = dict(name="layers.0.mlp.up_proj.weight", out_dtype=torch.float32, lambda_=0.3, ridge=0.1)
    on_cpu = merge_tensors("fda", models, base.bfloat16(), **kwargs)
    on_gpu = merge_tensors("fda", [m.cuda() for m in models], base.bfloat16().cuda(), **kwargs)
    assert on_gpu.device.type == "cuda"
    change = (on_cpu - base.bfloat16().float()).abs().max()
    assert (on_gpu.cpu() - on_cpu).abs().max() <= 1e-3 * change


@pytest.mark.parametrize("where", ["model", "base"])
def test_a_nan_input_names_the_tensor_and_the_model(where):
    """A NaN used to reach the fit's eigen-solver (LinAlgError: failed to converge)."""
    from fastmerge.errors import PlanError

    base = rand(8, 6, seed=91)
    models = [base + 1e-3, base - 1e-3]
    broken = (models[1] if where == "model" else base).clone()
    broken[2, 3] = float("nan")
    if where == "model":
        models[1] = broken
    else:
        base = broken
    named = "model 1" if where == "model" else "the base model"
    with pytest.raises(PlanError, match=f"tensor layers.1.w.weight of {named} holds NaN"):
        merge_tensors("fda", models, base, name="layers.1.w.weight", anchors=4, steps=2, ridge=0.0)


def test_a_nan_in_a_checkpoint_stops_a_config_merge(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from fastmerge.errors import PlanError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["ft1"], broken)
    files = sorted(broken.glob("*.safetensors"))
    for file in files:
        tensors = load_file(file)
        name = next((n for n, t in tensors.items() if t.dim() == 2 and "embed" not in n), None)
        if name is not None:
            tensors[name] = tensors[name].clone()
            tensors[name][0, 0] = float("nan")
            save_file(tensors, file, metadata={"format": "pt"})
            break
    config = write_config(tmp_path / "fda.yml", {
        "merge_method": "fda",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(broken)}, {"model": str(tiny_models["ft2"])}],
        "parameters": {"anchors": 4, "steps": 2},
    })
    with pytest.raises(PlanError, match=f"tensor {name} of model {broken} holds NaN"):
        run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
