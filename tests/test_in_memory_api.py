"""What the in-memory API (merge_tensors, merge_state_dicts) and fastmerge.run do with what a
caller may hand them by mistake: each is an error naming the argument, never a wrong result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastmerge
from fastmerge.errors import ConfigError, PlanError

GEN = torch.Generator().manual_seed(0)
A, B, BASE = (torch.randn(16, 32, generator=GEN) for _ in range(3))


def test_a_linear_merge_ignores_an_integer_base_and_a_method_that_uses_it_refuses_it():
    """The base was taken as the reference even for linear, so an int base came back unmerged."""
    ones, threes = torch.ones(4, 4), torch.full((4, 4), 3.0)
    int_base = {"a": torch.zeros(4, 4, dtype=torch.long)}
    merged = fastmerge.merge_state_dicts("linear", [{"a": ones}, {"a": threes}], base=int_base, weight=1.0)
    assert torch.equal(merged["a"], torch.full((4, 4), 2.0))
    with pytest.raises(PlanError, match="tensor a is a float tensor in some state dicts .*only float tensors merge"):
        fastmerge.merge_state_dicts("ties", [{"a": ones}, {"a": threes}], base=int_base, weight=1.0)
    buffers = fastmerge.merge_state_dicts("ties", [{"n": torch.tensor(1)}, {"n": torch.tensor(2)}],
                                          base={"n": torch.tensor(7)}, weight=1.0)
    assert buffers["n"].item() == 7  # integer buffers are copied from the base


def test_one_tensor_is_not_a_list_of_models():
    with pytest.raises(ConfigError, match=r"one tensor per model, got a Tensor; wrap one model's tensor in a list, \[x\]"):
        fastmerge.merge_tensors("linear", A, weight=1.0)


@pytest.mark.parametrize("method, extra", [("ram", {}), ("sce", {}), ("nearswap", {"t": 0.5}), ("arcee_fusion", {}),
                                           ("linear", {"weight": 1.0}), ("ties", {"weight": 1.0})])
def test_inputs_of_different_shapes_are_named(method, extra):
    """Even with the same element count: ram and sce merged a (32, 16) with a (16, 32) silently."""
    with pytest.raises(PlanError, match=r"tensor t: tensors\[1\] has shape \[32, 16\] but tensors\[0\] has \[16, 32\]"):
        fastmerge.merge_tensors(method, [A, B.reshape(32, 16)], base=BASE, name="t", **extra)
    if method != "linear":  # linear takes no base
        with pytest.raises(PlanError, match=r"the base has shape \[32, 16\]"):
            fastmerge.merge_tensors(method, [A, B], base=BASE.reshape(32, 16), name="t", **extra)


@pytest.mark.parametrize("bad, message", [
    (["abc", B], r"tensors\[0\] is a str, not a torch.Tensor"),
    ([A.numpy(), B], r"tensors\[0\] is a ndarray, not a torch.Tensor"),
    ([A.to_sparse(), B], r"tensors\[0\] is a torch.sparse_coo tensor; pass it dense"),
    ([A.long(), B.long()], r"tensors\[0\] has dtype torch.int64; only float tensors merge"),
])
def test_what_is_not_a_float_tensor_is_named(bad, message):
    with pytest.raises(fastmerge.FastmergeError, match=message):
        fastmerge.merge_tensors("linear", bad, weight=1.0)


def test_other_arguments_are_checked():
    with pytest.raises(ConfigError, match="the base is a str"):
        fastmerge.merge_tensors("ties", [A, B], base="b", weight=1.0)
    with pytest.raises(ConfigError, match="name must be the tensor's name"):
        fastmerge.merge_tensors("linear", [A, B], name=None, weight=1.0)
    with pytest.raises(ConfigError, match=r"seed must be an integer from 0 to 2\*\*64 - 1, got -1"):
        fastmerge.merge_tensors("dare_ties", [A, B], base=BASE, weight=1.0, density=0.5, seed=-1)
    with pytest.raises(ConfigError, match="give `lambda_` or `lambda`, not both"):
        fastmerge.merge_tensors("ties", [A, B], base=BASE, weight=1.0, lambda_=1.0, **{"lambda": 2.0})
    with pytest.raises(ConfigError, match="parameter `weight` of model 0 must be a number, got None"):
        fastmerge.merge_tensors("linear", [A, B], weight=[None, 1.0])
    with pytest.raises(ConfigError, match=r"`out_dtype: 'float64'` is not a supported dtype"):
        fastmerge.merge_tensors("linear", [A, B], weight=1.0, out_dtype="float64")
    with pytest.raises(ConfigError, match="out_dtype must be torch.float32"):
        fastmerge.merge_tensors("linear", [A, B], weight=1.0, out_dtype=torch.float64)


def test_numpy_and_torch_parameter_values_are_numbers_nan_included():
    expected = fastmerge.merge_tensors("linear", [A, B], weight=[0.25, 0.75])
    for weights in (np.array([0.25, 0.75]), torch.tensor([0.25, 0.75]), [np.float32(0.25), torch.tensor(0.75)]):
        assert torch.equal(fastmerge.merge_tensors("linear", [A, B], weight=weights), expected)
    for nan in (np.float32("nan"), torch.tensor(float("nan"))):
        with pytest.raises(ConfigError, match="parameter `weight` of model 0 is nan for tensor tensor; it must be finite"):
            fastmerge.merge_tensors("linear", [A, B], weight=[nan, 1.0])
    with pytest.raises(ConfigError, match="parameter `lambda` of the merge is inf"):
        fastmerge.merge_tensors("ties", [A, B], base=BASE, weight=1.0, lambda_=np.float64("inf"))


def test_the_output_dtype_is_a_config_merge_s():
    """Inputs of different dtypes promote as in a config merge (the first input's dtype won
    before, so the order mattered); fp8 and fp64 inputs give fp32 (fp64 failed in the kernels)."""
    ones = torch.ones(4, 4)
    for pair in ([ones.bfloat16(), ones], [ones, ones.bfloat16()]):
        assert fastmerge.merge_tensors("linear", pair, weight=1.0).dtype == torch.float32
    assert fastmerge.merge_tensors("linear", [ones.to(torch.float8_e4m3fn)] * 2, weight=1.0).dtype == torch.float32
    from_fp64 = fastmerge.merge_tensors("ties", [A.double(), B.double()], base=BASE.double(), weight=1.0, density=0.5)
    assert torch.equal(from_fp64, fastmerge.merge_tensors("ties", [A, B], base=BASE, weight=1.0, density=0.5))
    assert fastmerge.merge_tensors("linear", [A, B], weight=1.0, out_dtype="bfloat16").dtype == torch.bfloat16


def test_a_method_that_needs_whole_models_says_so():
    with pytest.raises(ConfigError, match="merge_method recall .* run it from a config"):
        fastmerge.merge_tensors("recall", [A, B])


def test_parameters_are_checked_when_no_tensor_needs_a_merge():
    with pytest.raises(ConfigError, match="unknown parameter `wieght` for merge_method linear"):
        fastmerge.merge_state_dicts("linear", [{}, {}], wieght=2)
    with pytest.raises(PlanError, match=r"the base state dict: key 3 is a int; tensor names are strings"):
        fastmerge.merge_state_dicts("ties", [{"a": A}], base={3: A}, weight=1.0)


def test_a_run_over_fp64_checkpoints_writes_fp32_and_restores_the_thread_count(tmp_path):
    """A flat merge of F64 safetensors failed mid-merge in the kernels; `threads` stayed set for
    the rest of the caller's process."""
    for name, tensor in (("a", A), ("b", B)):
        (tmp_path / name).mkdir()
        save_file({"w": tensor.double()}, tmp_path / name / "model.safetensors")
    config = {"merge_method": "linear", "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0}}
                                                   for n in ("a", "b")]}
    threads = torch.get_num_threads()
    fastmerge.run(config, tmp_path / "out", flat="error", threads=1, quiet=True)
    assert torch.get_num_threads() == threads
    merged = load_file(tmp_path / "out" / "model.safetensors")["w"]
    assert torch.equal(merged, fastmerge.merge_tensors("linear", [A, B], weight=1.0))
    with pytest.raises(ConfigError, match="seed must be an integer from 0"):
        fastmerge.run(config, tmp_path / "out2", flat="error", seed=-1, quiet=True)
    assert not (tmp_path / "out2").exists()


def test_the_kernels_refuse_numbers_that_are_not():
    """A NaN weight made every element NaN; a scalar where a list belongs was a TypeError."""
    from fastmerge import ops
    from fastmerge.errors import KernelError

    with pytest.raises(KernelError, match=r"blend: weights\[0\] is nan; it must be a finite number"):
        ops.blend([A, B], [float("nan"), 1.0])
    with pytest.raises(KernelError, match=r"blend: lam\[0\] is nan"):
        ops.blend([A, B], [1.0, 1.0], base=BASE, lam=float("nan"))
    with pytest.raises(KernelError, match=r"ties_merge: weights\[1\] is inf"):
        ops.ties_merge(BASE, [A, B], [1.0, float("inf")])
    with pytest.raises(KernelError, match="ties_merge: weights must be a list with one value per input, got 1.0"):
        ops.ties_merge(BASE, [A, B], 1.0)
    with pytest.raises(KernelError, match=r"ties_merge: gamma\[0\] is 2.0; it must be a finite number from 0.0 to 1.0"):
        ops.ties_merge(BASE, [A, B], [1.0, 1.0], densities=[0.5, 0.5], sparsify="magnitude_outliers", gamma=2.0)
    with pytest.raises(KernelError, match="k must be an integer .* got 1.5"):
        ops.magnitude_threshold(A, 1.5)


@pytest.mark.parametrize("method, params, message", [
    ("karcher", {"max_iter": 2.5}, "`max_iter` of merge_method karcher must be an integer >= 0"),
    ("karcher", {"tol": -1.0}, "`tol` of merge_method karcher must be a number >= 0.0"),
    ("ram", {"epsilon": -1.0}, "`epsilon` of merge_method ram must be a number >= 0.0"),
    ("ramplus_tl", {"r": -2.0}, "`r` of merge_method ramplus_tl must be a number >= 0.0"),
    ("sce", {"select_topk": 2.0}, "`select_topk` of merge_method sce must be a number from 0.0 to 1.0"),
])
def test_method_parameters_out_of_range_are_named(method, params, message):
    """They ran without a word: karcher's max_iter 2.5 as 2, sce's select_topk 2 as 1."""
    with pytest.raises(ConfigError, match=message):
        fastmerge.merge_tensors(method, [A, B], base=BASE, **params)


def test_every_command_checks_its_seed(tmp_path):
    """build_moe and tokensurgeon stopped in torch ('manual_seed expected a long')."""
    from fastmerge import build_moe, extract_lora, tokensurgeon

    for call in (lambda: build_moe({}, tmp_path / "moe", seed="x"),
                 lambda: tokensurgeon(tmp_path / "m", tmp_path / "d", tmp_path / "t", seed="x"),
                 lambda: extract_lora(tmp_path / "m", tmp_path / "b", tmp_path / "l", seed=2**64)):
        with pytest.raises(ConfigError, match="seed must be an integer from 0 to 2\\*\\*64 - 1"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_an_array_of_weights_is_narrowed_to_the_state_dicts_that_have_a_key():
    a, b, c = {"x": torch.ones(3)}, {"x": torch.full((3,), 3.0), "y": torch.ones(2)}, {"x": torch.zeros(3), "y": torch.zeros(2)}
    merged = fastmerge.merge_state_dicts("linear", [a, b, c], missing="union", weight=np.array([1.0, 1.0, 2.0]))
    assert torch.equal(merged["x"], torch.ones(3))  # (1 + 3 + 0) / 4
    assert torch.equal(merged["y"], fastmerge.merge_tensors("linear", [b["y"], c["y"]], weight=[1.0, 2.0]))
