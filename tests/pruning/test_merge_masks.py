import re

import pytest
import torch

from fastmerge.methods.base import TensorTask
from fastmerge.methods.masks import mask_output, masked_inputs
from fastmerge.pruning.mask_file import MaskSet


def test_masked_inputs_mask_task_vectors_and_output_mask_zeroes():
    base = torch.randn(4, 8)
    x1, x2 = base + torch.randn(4, 8), base + torch.randn(4, 8)
    keep = torch.rand(4, 8) > 0.5
    masks = MaskSet.from_dense({"w": keep}, "arch")
    task = TensorTask(name="w", inputs=[x1, x2], base=base, params=[{}, {}], global_params={}, out_dtype=torch.float32)
    masked = masked_inputs(task, [masks, None])
    assert torch.equal(masked.inputs[0], torch.where(keep, x1, base)) and masked.inputs[1] is x2
    other = TensorTask(name="v", inputs=[x1], base=base, params=[{}], global_params={}, out_dtype=torch.float32)
    assert masked_inputs(other, [masks]).inputs[0] is x1
    assert torch.equal(mask_output("w", x1, masks), torch.where(keep, x1, torch.zeros(())))
    assert mask_output("v", x1, masks) is x1


def test_masks_inside_a_config_merge(tiny_models, tmp_path):
    """`parameters: {mask: ...}` masks that model's task vector and `output_mask` keeps the
    merged model sparse, through fastmerge.run."""
    import fastmerge
    from _support import load_dir

    base, ft1, ft2 = (load_dir(tiny_models[n]) for n in ("base", "ft1", "ft2"))
    name = "model.layers.1.mlp.up_proj.weight"
    generator = torch.Generator().manual_seed(0)
    keep1 = torch.rand(base[name].shape, generator=generator) > 0.5
    keep_out = torch.rand(base[name].shape, generator=generator) > 0.3
    shapes = {n: tuple(t.shape) for n, t in base.items()}
    from fastmerge.pruning.mask_file import architecture_fingerprint

    arch = architecture_fingerprint(shapes.items())
    MaskSet.from_dense({name: keep1}, arch).save(tmp_path / "m1.safetensors")
    MaskSet.from_dense({name: keep_out}, arch).save(tmp_path / "out_mask.safetensors")
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_models["base"]),
        "models": [
            {"model": str(tiny_models["ft1"]), "parameters": {"weight": 0.5, "mask": str(tmp_path / "m1.safetensors")}},
            {"model": str(tiny_models["ft2"]), "parameters": {"weight": 0.5}},
        ],
        "output_mask": str(tmp_path / "out_mask.safetensors"),
    }
    merged = load_dir(fastmerge.run(config, tmp_path / "out", quiet=True).output_dir)
    masked_ft1 = {**ft1, name: torch.where(keep1, ft1[name], base[name])}
    expected = fastmerge.merge_state_dicts("task_arithmetic", [masked_ft1, ft2], base=base, weight=0.5)
    assert torch.equal(merged[name], torch.where(keep_out, expected[name], torch.zeros((), dtype=expected[name].dtype)))
    other = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[other], expected[other])


def test_an_output_that_would_replace_a_mask_it_reads_is_refused(tiny_models, tmp_path):
    """Masks are inputs too: --overwrite must not replace the directory they lie in (an earlier
    prune's output, say)."""
    import pytest

    import fastmerge
    from _support import load_dir, snapshot
    from fastmerge.errors import OutputError
    from fastmerge.pruning.mask_file import architecture_fingerprint

    shapes = {n: tuple(t.shape) for n, t in load_dir(tiny_models["base"]).items()}
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    name = "model.layers.1.mlp.up_proj.weight"
    MaskSet.from_dense({name: torch.ones(shapes[name], dtype=torch.bool)}, architecture_fingerprint(shapes.items())).save(
        pruned / "masks.safetensors")
    before = snapshot(pruned)
    for where in ("mask", "output_mask"):
        mask = str(pruned / "masks.safetensors")
        config = {"merge_method": "linear", "models": [
            {"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0, **({"mask": mask} if where == "mask" else {})}}],
            **({"output_mask": mask} if where == "output_mask" else {})}
        with pytest.raises(OutputError, match=f"input {pruned / 'masks.safetensors'} is inside output {pruned}, "
                                              "which --overwrite would delete"):
            fastmerge.run(config, pruned, overwrite=True, quiet=True)
    assert snapshot(pruned) == before


def test_mask_for_another_model_is_refused(tiny_models, tmp_path):
    import pytest

    import fastmerge
    from fastmerge.errors import CheckpointError

    MaskSet.from_dense({"x": torch.ones(3, dtype=torch.bool)}, "other-arch").save(tmp_path / "m.safetensors")
    config = {
        "merge_method": "linear",
        "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0, "mask": str(tmp_path / "m.safetensors")}}],
    }
    with pytest.raises(CheckpointError, match="another architecture"):
        fastmerge.run(config, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_a_mask_naming_a_tensor_the_model_lacks_is_refused(tiny_models, tmp_path):
    import fastmerge
    from _support import load_dir
    from fastmerge.errors import CheckpointError
    from fastmerge.pruning.mask_file import architecture_fingerprint

    shapes = {n: tuple(t.shape) for n, t in load_dir(tiny_models["base"]).items()}
    renamed = "model.layers.0.mlp.upp.weight"
    MaskSet.from_dense({renamed: torch.ones(shapes["model.layers.0.mlp.up_proj.weight"], dtype=torch.bool)},
                       architecture_fingerprint(shapes.items())).save(tmp_path / "m.safetensors")
    config = {
        "merge_method": "linear",
        "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0, "mask": str(tmp_path / "m.safetensors")}}],
    }
    with pytest.raises(CheckpointError, match=f"m.safetensors was made for .* \\(it masks {renamed}, which the merged model"):
        fastmerge.run(config, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_a_mask_setting_must_be_a_path():
    from fastmerge.errors import ConfigError
    from fastmerge.methods.masks import mask_file_setting

    assert mask_file_setting("pruned/masks.safetensors") == "pruned/masks.safetensors"
    for value in (3, 2.5, "", "  ", ["a"], True):
        with pytest.raises(ConfigError, match=f"parameter `mask` must be the path of a masks.safetensors file.*got {re.escape(repr(value))}"):
            mask_file_setting(value)
    with pytest.raises(ConfigError, match="`output_mask` must be the path"):
        mask_file_setting("", "`output_mask`")


def _merge_with_mask(tiny_models, tmp_path, mask):
    import fastmerge

    config = {
        "merge_method": "linear",
        "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0, "mask": mask}}],
    }
    return fastmerge.run(config, tmp_path / "out", quiet=True)


@pytest.mark.parametrize("mask", [3, ""])
def test_a_bad_mask_setting_stops_a_config_merge(tiny_models, tmp_path, mask):
    from fastmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="parameter `mask` must be the path"):
        _merge_with_mask(tiny_models, tmp_path, mask)
    assert not (tmp_path / "out").exists()
