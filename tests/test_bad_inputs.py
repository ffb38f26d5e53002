"""Every bad input from the foundation issue, through the CLI: a clear message naming the culprit,
exit status 2, no output directory (complete-looking or not) and inputs untouched."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from _support import snapshot, write_config
from fastmerge.cli import main


def run_cli(tmp_path: Path, config: dict, *extra: str, out: Path | None = None) -> tuple[int, Path]:
    path = write_config(tmp_path / "merge.yml", config)
    out = out or tmp_path / "merged"
    return main(["run", str(path), str(out), "--quiet", *extra]), out


def linear_config(*models: Path, **params) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        **params,
    }


def assert_failed_cleanly(code: int, out: Path, capsys, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "fastmerge-tmp" in p.name]


def first_shard(model: Path) -> Path:
    return sorted(model.glob("model-*.safetensors"))[0]


def test_missing_model_dir(tiny_models, tmp_path, capsys):
    missing = tmp_path / "nope"
    code, out = run_cli(tmp_path, linear_config(tiny_models["ft1"], missing))
    assert_failed_cleanly(code, out, capsys, str(missing))


def test_a_missing_relative_model_path_says_where_it_was_looked_for(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(tmp_path, linear_config(tiny_models["ft1"], Path("models/nope")))
    assert_failed_cleanly(code, out, capsys, f"models/nope: no such model directory or file (looked for {tmp_path / 'models' / 'nope'})")


def test_missing_tensor_in_one_model(tiny_models, tmp_path, capsys):
    from _support import TINY
    from fastmerge.demo import make_state, write_checkpoint

    state = make_state(TINY, 5)
    del state["model.layers.1.mlp.up_proj.weight"]
    partial = write_checkpoint(tmp_path / "partial", state, TINY)
    code, out = run_cli(tmp_path, linear_config(tiny_models["ft1"], partial))
    assert_failed_cleanly(code, out, capsys, "model.layers.1.mlp.up_proj.weight", str(partial))


def _without(tmp_path: Path, name: str, seed: int, *missing: str) -> Path:
    from _support import TINY
    from fastmerge.demo import make_state, write_checkpoint

    state = make_state(TINY, seed)
    for tensor in missing:
        del state[tensor]
    return write_checkpoint(tmp_path / name, state, TINY)


@pytest.mark.parametrize("role", ["first model", "base model", "slice's first source"])
def test_a_tensor_the_model_naming_the_outputs_tensors_lacks_stops_the_merge(tiny_models, tmp_path, capsys, role):
    """The output's tensor names come from the base (else the first model; in slices, each
    slice's first source names its layers): a tensor it lacks but another model has would be
    left out of the output, a model missing a layer, so the merge stops whichever model lacks it."""
    partial = _without(tmp_path, "partial", 5, "model.layers.1.mlp.up_proj.weight")
    if role == "first model":
        config = linear_config(partial, tiny_models["ft1"])
    elif role == "base model":
        config = {"merge_method": "task_arithmetic", "base_model": str(partial),
                  "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0}}]}
    else:
        config = {"merge_method": "slerp", "base_model": str(partial), "parameters": {"t": 0.5},
                  "slices": [{"sources": [{"model": str(m), "layer_range": [0, 3]} for m in (partial, tiny_models["ft1"])]}]}
    code, out = run_cli(tmp_path, config)
    assert_failed_cleanly(code, out, capsys, f"model.layers.1.mlp.up_proj.weight is missing from model {partial}",
                          f"though model {tiny_models['ft1']} has it")


def test_a_slice_takes_only_its_layers_and_a_later_slice_its_own(tiny_models, tmp_path):
    """A model that lacks a tensor outside the layers a slice takes from it merges: only the
    layers in its range must match."""
    partial = _without(tmp_path, "partial", 5, "model.layers.2.mlp.up_proj.weight")
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(partial), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(tiny_models["ft1"]), "layer_range": [2, 3]}]}]}
    code, out = run_cli(tmp_path, config)
    assert code == 0 and (out / "model.safetensors").exists()


def test_saved_rotary_buffers_are_left_out_whichever_models_have_them(tiny_models, tmp_path, capsys):
    """Old Llama conversions saved RoPE's inv_freq, which transformers recomputes: the merge
    leaves it out (as mergekit does), in either model order, and says so."""
    import torch

    from _support import TINY, load_dir
    from fastmerge.demo import make_state, write_checkpoint

    state = make_state(TINY, 5)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    with_buffer = write_checkpoint(tmp_path / "with-buffer", state, TINY)
    outputs = []
    for order in ((with_buffer, tiny_models["ft1"]), (tiny_models["ft1"], with_buffer)):
        out = tmp_path / f"merged-{len(outputs)}"
        code, out = run_cli(tmp_path, linear_config(*order), out=out)
        assert code == 0
        outputs.append(load_dir(out))
    assert not any("inv_freq" in name for name in outputs[0])
    assert outputs[0].keys() == outputs[1].keys() == set(make_state(TINY, 5))
    assert "left out 1 saved rotary_emb.inv_freq buffer" in capsys.readouterr().out


def test_a_config_that_is_not_utf8_or_not_a_file(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yml"
    latin1.write_bytes(b"merge_method: linear\n# caf\xe9\n")
    for config, message in ((latin1, f"config file {latin1}: cannot read it as UTF-8 text"),
                            (tmp_path, f"config file {tmp_path} is not a file")):
        assert main(["run", str(config), str(tmp_path / "merged"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_an_os_error_no_check_foresaw_exits_2_with_its_message(tiny_models, tmp_path, capsys, monkeypatch):
    """A file that turns unreadable, a disk that fills up while a config is written: the
    operating system's error, with its path, and exit status 2, not a traceback."""
    from fastmerge.io import output_dir

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "merged" / "config.json"))

    monkeypatch.setattr(output_dir, "write_model_config", full)
    code, out = run_cli(tmp_path, linear_config(tiny_models["ft1"]))
    assert_failed_cleanly(code, out, capsys, "No space left on device", "config.json")


@pytest.mark.parametrize("method, place", [("slerp", "t"), ("nearswap", "t"), ("passthrough", "scale")])
def test_a_word_where_a_parameter_without_default_needs_a_number(tiny_models, tmp_path, capsys, method, place):
    """slerp's and nearswap's `t` and passthrough's `scale` have no default, so the planner's
    number check (which follows a default) never saw them: a string went on to a float() deep
    in the merge and a traceback."""
    if method == "passthrough":
        config = {"merge_method": method, "models": [{"model": str(tiny_models["ft1"]), "parameters": {"scale": "abc"}}]}
    else:
        config = {"merge_method": method, "base_model": str(tiny_models["base"]), "parameters": {"t": "abc"},
                  "models": [{"model": str(tiny_models["ft1"])}, {"model": str(tiny_models["base"])}]}
    code, out = run_cli(tmp_path, config)
    assert_failed_cleanly(code, out, capsys, f"parameter `{place}` must be a number for tensor", "got 'abc'")


def test_a_tensor_stored_as_integers_in_one_model_and_floats_in_another(tiny_models, tmp_path, capsys):
    """Found before anything is written, with the tensor and both models named (it stopped
    mid-merge with only "native kernels do not support dtype torch.int16")."""
    import torch

    from _support import TINY
    from fastmerge.demo import make_state, write_checkpoint

    from safetensors.torch import load_file, save_file

    odd = write_checkpoint(tmp_path / "odd", make_state(TINY, 5), TINY)
    name = "model.layers.1.mlp.up_proj.weight"
    for shard in odd.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = tensors[name].to(torch.int16)
            save_file(tensors, shard)
    code, out = run_cli(tmp_path, linear_config(tiny_models["ft1"], odd))
    assert_failed_cleanly(code, out, capsys, f"tensor {name} is int16 in {odd}", f"in {tiny_models['ft1']}",
                          "every model must store it as one kind")


def test_a_nan_that_stops_a_selection_names_the_model(tiny_models, tmp_path, capsys):
    from _support import TINY
    from fastmerge.demo import make_state, write_checkpoint

    state = make_state(TINY, 5)
    name = "model.layers.0.mlp.up_proj.weight"
    state[name][0, 0] = float("nan")
    nan = write_checkpoint(tmp_path / "nan", state, TINY)
    config = {"merge_method": "ties", "base_model": str(tiny_models["base"]),
              "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in (tiny_models["ft1"], nan)]}
    code, out = run_cli(tmp_path, config)
    assert_failed_cleanly(code, out, capsys, f"{name} (model {nan}) contains NaN")


def test_a_model_with_fewer_layers_in_a_models_merge(tiny_models, tmp_path, capsys):
    from _support import TINY
    from fastmerge.demo import LlamaShape, make_state, write_checkpoint

    shallow_shape = LlamaShape(**{**TINY.__dict__, "num_hidden_layers": 2})
    shallow = write_checkpoint(tmp_path / "shallow", make_state(shallow_shape, 1), shallow_shape)
    code, out = run_cli(tmp_path, linear_config(tiny_models["ft1"], shallow))
    assert_failed_cleanly(code, out, capsys, f"{shallow} has 2 layers but {tiny_models['ft1']} has 3")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs"])
@pytest.mark.parametrize("density", [1.5, -0.1, True])
def test_a_density_outside_0_to_1_is_refused(tiny_models, tmp_path, capsys, method, density):
    """The fraction of a task vector kept: 1.5 kept all and -0.1 none without a word."""
    config = {"merge_method": method, "base_model": str(tiny_models["base"]),
              "models": [{"model": str(tiny_models["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": str(tiny_models["ft2"]), "parameters": {"weight": 1.0, "density": density}}]}
    code, out = run_cli(tmp_path, config)
    assert_failed_cleanly(code, out, capsys, f"parameter `density` of model {tiny_models['ft2']} is {density!r} for tensor",
                          "it must be a number from 0 to 1")


def test_shape_mismatch(tiny_models, tmp_path, capsys):
    from _support import TINY
    from fastmerge.demo import LlamaShape, make_state, write_checkpoint

    wide = LlamaShape(**{**TINY.__dict__, "intermediate_size": 80})
    other = write_checkpoint(tmp_path / "wide", make_state(wide, 1), wide)
    code, out = run_cli(tmp_path, linear_config(tiny_models["ft1"], other))
    assert_failed_cleanly(code, out, capsys, "shape", "mlp")


@pytest.mark.parametrize("target", ["../x.safetensors", "/etc/passwd"])
def test_weight_map_escaping_the_model_dir(tiny_models, tmp_path, capsys, target):
    ft2 = tiny_models["ft2"]
    before = snapshot(ft2)
    index_path = ft2 / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = target
    index_path.write_text(json.dumps(index))
    code, out = run_cli(tmp_path, linear_config(tiny_models["ft1"], ft2))
    assert_failed_cleanly(code, out, capsys, target)
    assert snapshot(ft2).keys() == before.keys()


def corrupt(shard: Path, mutate) -> None:
    data = bytearray(shard.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    new_header, new_data = mutate(header, data, length)
    if new_header is not None:
        encoded = json.dumps(new_header).encode()
        encoded += b" " * (-len(encoded) % 8)
        new_data = struct.pack("<Q", len(encoded)) + encoded + bytes(data[8 + length :])
    shard.write_bytes(new_data)


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _truncated_header(header, data, length):
    return None, bytes(data[: 8 + length // 2])


def _garbage_header(header, data, length):
    return None, bytes(data[:8]) + b"\xff" * length + bytes(data[8 + length :])


def _length_past_end(header, data, length):
    return None, struct.pack("<Q", len(data) * 4) + bytes(data[8:])


def _overlap(header, data, length):
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    begin, end = header[second]["data_offsets"]
    start = header[first]["data_offsets"][0] + 2
    header[second]["data_offsets"] = [start, start + end - begin]
    return header, None


def _out_of_file(header, data, length):
    name = _first_tensor(header)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 10**9, end + 10**9]
    return header, None


def _unknown_dtype(header, data, length):
    header[_first_tensor(header)]["dtype"] = "F12"
    return header, None


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (_truncated_header, "header"),
        (_garbage_header, "header"),
        (_length_past_end, "header"),
        (_overlap, "overlap"),
        (_out_of_file, "offset"),
        (_unknown_dtype, "F12"),
    ],
    ids=["truncated", "corrupt", "length-past-end", "overlap", "out-of-file", "unknown-dtype"],
)
def test_corrupt_safetensors(tiny_models, tmp_path, capsys, mutate, fragment):
    shard = first_shard(tiny_models["ft2"])
    corrupt(shard, mutate)
    code, out = run_cli(tmp_path, linear_config(tiny_models["ft1"], tiny_models["ft2"]))
    err_out = capsys.readouterr().err
    assert code == 2 and str(shard) in err_out and fragment.lower() in err_out.lower(), err_out
    assert not out.exists()


def test_unknown_method(tiny_models, tmp_path, capsys):
    code, out = run_cli(tmp_path, {**linear_config(tiny_models["ft1"]), "merge_method": "frobnicate"})
    assert_failed_cleanly(code, out, capsys, "frobnicate", "linear")


def test_unknown_parameter(tiny_models, tmp_path, capsys):
    config = linear_config(tiny_models["ft1"])
    config["models"][0]["parameters"]["wieght"] = 0.5
    code, out = run_cli(tmp_path, config)
    assert_failed_cleanly(code, out, capsys, "wieght", "models[0].parameters")


def test_unknown_config_key(tiny_models, tmp_path, capsys):
    code, out = run_cli(tmp_path, {**linear_config(tiny_models["ft1"]), "merge_mehtod": "linear"})
    assert_failed_cleanly(code, out, capsys, "merge_mehtod")


def test_wrong_parameter_type(tiny_models, tmp_path, capsys):
    config = linear_config(tiny_models["ft1"])
    config["models"][0]["parameters"]["weight"] = "heavy"
    code, out = run_cli(tmp_path, config)
    assert_failed_cleanly(code, out, capsys, "weight", "heavy")


def test_missing_required_weight(tiny_models, tmp_path, capsys):
    config = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft1"])}]}
    code, out = run_cli(tmp_path, config)
    assert_failed_cleanly(code, out, capsys, "weight", str(tiny_models["ft1"]))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight(tiny_models, tmp_path, capsys, value):
    config = linear_config(tiny_models["ft1"], tiny_models["ft2"])
    config["models"][1]["parameters"]["weight"] = value
    code, out = run_cli(tmp_path, config)
    assert_failed_cleanly(code, out, capsys, "weight", "finite")


def test_output_equal_to_input(tiny_models, tmp_path, capsys):
    before = snapshot(tiny_models["ft1"])
    path = write_config(tmp_path / "merge.yml", linear_config(tiny_models["ft1"], tiny_models["ft2"]))
    code = main(["run", str(path), str(tiny_models["ft1"]), "--overwrite", "--quiet"])
    assert code == 2 and "input" in capsys.readouterr().err
    assert snapshot(tiny_models["ft1"]) == before


def test_output_inside_input(tiny_models, tmp_path, capsys):
    out = tiny_models["ft1"] / "merged"
    code, _ = run_cli(tmp_path, linear_config(tiny_models["ft1"]), out=out)
    assert_failed_cleanly(code, out, capsys, str(tiny_models["ft1"]))


def test_output_exists_without_overwrite(tiny_models, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _ = run_cli(tmp_path, linear_config(tiny_models["ft1"]))
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_midway_leaves_no_output(tiny_models, tmp_path, capsys):
    """A shard whose data is cut short is only noticed when read: the merge must still leave
    nothing at OUT."""
    shard = sorted(tiny_models["ft2"].glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-16])
    code, out = run_cli(tmp_path, linear_config(tiny_models["ft1"], tiny_models["ft2"]))
    assert code == 2
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "fastmerge-tmp" in p.name]


def test_verbose_shows_traceback(tiny_models, tmp_path, capsys):
    path = write_config(tmp_path / "merge.yml", {**linear_config(tiny_models["ft1"]), "merge_method": "nope"})
    assert main(["-v", "run", str(path), str(tmp_path / "o"), "--quiet"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("device, fragment", [
    ("tpu", "--device 'tpu' is not a device"),
    ("cuda:x", "--device 'cuda:x' is not a device"),
    ("meta", "device meta is not supported"),
    ("cuda:99", "CUDA GPU"),  # no GPU here, or too few where there is one
])
def test_bad_device(tiny_models, tmp_path, capsys, device, fragment):
    code, out = run_cli(tmp_path, linear_config(tiny_models["ft1"], tiny_models["ft2"]), "--device", device)
    assert_failed_cleanly(code, out, capsys, fragment)
