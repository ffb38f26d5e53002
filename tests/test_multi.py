"""Multi-merge files (mergekit-multi's format): merges that read earlier merges' outputs, run in
dependency order, lazily, every config checked before the first merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from _support import load_dir, snapshot
from fastmerge import run
from fastmerge.cli import main, mergekit_multi_main
from fastmerge.errors import ConfigError
from fastmerge.multi import load_multi, run_multi

Q = "model.layers.0.self_attn.q_proj"


def write_multi(path: Path, *documents: dict) -> Path:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


def two_stage(models: dict[str, Path]) -> list[dict]:
    """The final merge (first in the file) reads `soup`, which reads `pair`: order by need, not by place."""
    final = {"merge_method": "slerp", "base_model": str(models["base"]), "parameters": {"t": 0.4},
             "models": [{"model": str(models["base"])}, {"model": "soup"}]}
    soup = {"name": "soup", "merge_method": "ties", "base_model": str(models["base"]), "parameters": {"density": 0.6},
            "models": [{"model": "pair", "parameters": {"weight": 0.5}}, {"model": str(models["ft3"]), "parameters": {"weight": 0.5}}]}
    pair = {"name": "pair", "merge_method": "linear",
            "models": [{"model": str(models["ft1"]), "parameters": {"weight": 0.5}}, {"model": str(models["ft2"]), "parameters": {"weight": 0.5}}]}
    return [final, soup, pair]


def test_the_merges_equal_the_same_merges_run_one_by_one(tiny_models, tmp_path):
    final, soup, pair = two_stage(tiny_models)
    config = write_multi(tmp_path / "multi.yml", final, soup, pair)
    steps = run_multi(config, tmp_path / "work", tmp_path / "final", quiet=True)
    assert [s.merge.name for s in steps] == ["pair", "soup", None]
    assert all(s.report is not None for s in steps)

    by_hand = tmp_path / "by_hand"
    run({k: v for k, v in pair.items() if k != "name"}, by_hand / "pair", quiet=True)
    soup_config = {k: v for k, v in soup.items() if k != "name"}
    soup_config["models"] = [{"model": str(by_hand / "pair"), "parameters": {"weight": 0.5}}, soup["models"][1]]
    run(soup_config, by_hand / "soup", quiet=True)
    run(dict(final, models=[final["models"][0], {"model": str(by_hand / "soup")}]), by_hand / "final", quiet=True)
    for ours, theirs in ((tmp_path / "work" / "pair", by_hand / "pair"), (tmp_path / "work" / "soup", by_hand / "soup"),
                         (tmp_path / "final", by_hand / "final")):
        a, b = load_dir(ours), load_dir(theirs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_rerun_keeps_finished_merges_unless_told_not_to(tiny_models, tmp_path):
    config = write_multi(tmp_path / "multi.yml", *two_stage(tiny_models))
    run_multi(config, tmp_path / "work", tmp_path / "final", quiet=True)
    before = snapshot(tmp_path / "work")
    steps = run_multi(config, tmp_path / "work", tmp_path / "final", quiet=True)
    assert [s.report for s in steps] == [None, None, None] and snapshot(tmp_path / "work") == before
    assert "kept the existing" in str(steps[0])
    with pytest.raises(Exception, match="exists"):
        run_multi(config, tmp_path / "work", tmp_path / "final", lazy=False, quiet=True)
    steps = run_multi(config, tmp_path / "work", tmp_path / "final", lazy=False, overwrite=True, quiet=True)
    assert all(s.report is not None for s in steps) and snapshot(tmp_path / "work") == before


def test_a_failed_run_resumes_where_it_stopped(tiny_models, tmp_path):
    """The second merge fails on a missing model; the first's output stays and is reused."""
    final, soup, pair = two_stage(tiny_models)
    soup["models"][1]["model"] = str(tmp_path / "not_yet")
    config = write_multi(tmp_path / "multi.yml", final, soup, pair)
    with pytest.raises(Exception, match="not_yet"):
        run_multi(config, tmp_path / "work", tmp_path / "final", quiet=True)
    assert (tmp_path / "work" / "pair" / "config.json").exists() and not (tmp_path / "work" / "soup").exists()
    write_multi(config, *two_stage(tiny_models))
    steps = run_multi(config, tmp_path / "work", tmp_path / "final", quiet=True)
    assert [s.report is None for s in steps] == [True, False, False]


LINEAR = {"merge_method": "linear", "models": [{"model": "/m", "parameters": {"weight": 1.0}}]}


def test_names_resolve_everywhere_a_model_is_named(tmp_path):
    adapter = tmp_path / "adapter"
    documents = [
        {"name": "a", "merge_method": "linear", "models": [{"model": "/m1"}, "/m2"]},
        {"merge_method": "passthrough", "tokenizer_source": "model:a", "slices": [
            {"sources": [{"model": f"a+{adapter}", "layer_range": [0, 2]}], "base_model": "a"},
            {"sources": [{"model": {"model": "a", "lora": str(adapter)}, "layer_range": [2, 4]}]},
            {"sources": [{"model": {"model": {"path": "a", "revision": None}}, "layer_range": [4, 6]}]}]},
    ]
    merges = load_multi(write_multi(tmp_path / "multi.yml", *documents), tmp_path / "work", tmp_path / "out")
    final = merges[-1].config
    out_a = str((tmp_path / "work" / "a").resolve())
    assert final["tokenizer_source"] == f"model:{out_a}"
    assert final["slices"][0]["sources"][0]["model"] == f"{out_a}+{adapter}"
    assert final["slices"][0]["base_model"] == out_a
    assert final["slices"][1]["sources"][0]["model"] == {"model": out_a, "lora": str(adapter)}
    assert final["slices"][2]["sources"][0]["model"] == {"model": {"path": out_a, "revision": None}}
    assert merges[0].config["models"] == [{"model": "/m1"}, "/m2"]
    assert merges[-1].needs == ["a"] and merges[-1].out == tmp_path / "out"


def test_names_resolve_in_the_tokenizer_block(tmp_path):
    block = {"source": "b", "tokens": {"x": {"source": "b"}, "y": {"source": {"kind": "model_token", "model": "b", "token_id": 1}},
                                       "z": {"source": {"kind": "zero"}}, "w": {"source": "/m1"}}}
    documents = [{"name": "b", **LINEAR}, {"merge_method": "linear", "tokenizer": block, "models": [{"model": "b", "parameters": {"weight": 1.0}}]}]
    final = load_multi(write_multi(tmp_path / "multi.yml", *documents), tmp_path / "work", tmp_path / "out")[-1]
    out_b = str((tmp_path / "work" / "b").resolve())
    assert final.config["tokenizer"] == {"source": out_b, "tokens": {
        "x": {"source": out_b}, "y": {"source": {"kind": "model_token", "model": out_b, "token_id": 1}},
        "z": {"source": {"kind": "zero"}}, "w": {"source": "/m1"}}}
    assert final.needs == ["b"]
    prefixed = [{"name": "b", **LINEAR}, {"merge_method": "linear", "tokenizer": {"source": "model:b"},
                                          "models": [{"model": "b", "parameters": {"weight": 1.0}}]},
                {"name": "c", **LINEAR, "tokenizer_source": "b"}]
    merges = load_multi(write_multi(tmp_path / "prefixed.yml", *prefixed), tmp_path / "work", tmp_path / "out")
    by_name = {m.name: m.config for m in merges}
    assert by_name[None]["tokenizer"]["source"] == f"model:{out_b}" and by_name["c"]["tokenizer_source"] == out_b


@pytest.mark.parametrize("documents, message", [
    ([dict(LINEAR, name="a"), dict(LINEAR, name="a")], "a second merge named 'a'"),
    ([LINEAR, LINEAR], "only one may be unnamed"),
    ([dict(LINEAR, name="a", models=[{"model": "b"}]), dict(LINEAR, name="b", models=[{"model": "a"}])], "cycle: a -> b -> a"),
    ([dict(LINEAR, name="x/y")], "plain directory name"),
    ([dict(LINEAR, name="a+b")], "plain directory name"),
    ([dict(LINEAR, name="a"), dict(LINEAR, merge_method="tiess")], "document 2.*tiess"),
    ([[1, 2]], "document 1 is not a mapping"),
], ids=["duplicate", "two unnamed", "cycle", "slash", "plus", "bad method", "not a mapping"])
def test_bad_multi_files_stop_before_any_merge(tmp_path, documents, message):
    config = write_multi(tmp_path / "multi.yml", *documents)
    with pytest.raises(ConfigError, match=message):
        load_multi(config, tmp_path / "work", tmp_path / "out")


def test_an_unnamed_merge_needs_an_output_path(tmp_path):
    with pytest.raises(ConfigError, match="--out-path"):
        load_multi(write_multi(tmp_path / "multi.yml", LINEAR), tmp_path / "work", None)
    (tmp_path / "empty.yml").write_text("---\n")
    with pytest.raises(ConfigError, match="no merge configs"):
        load_multi(tmp_path / "empty.yml", tmp_path / "work", None)


def test_the_cli_and_the_mergekit_multi_drop_in(tiny_models, tmp_path, capsys):
    config = write_multi(tmp_path / "multi.yml", *two_stage(tiny_models))
    assert main(["multi", str(config), "-I", str(tmp_path / "work"), "--out-path", str(tmp_path / "final"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "pair: merged" in printed and "final merge: merged" in printed
    code = mergekit_multi_main([str(config), "-I", str(tmp_path / "work"), "--out-path", str(tmp_path / "final"),
                                "--lora-merge-cache", str(tmp_path / "c"), "--allow-crimes", "--random-seed", "3"])
    out, err = capsys.readouterr()
    assert code == 0 and out.count("kept the existing") == 3 and "--lora-merge-cache accepted and ignored" in err
    bad = write_multi(tmp_path / "bad.yml", dict(LINEAR, name="a"), dict(LINEAR, name="a"))
    assert mergekit_multi_main([str(bad), "-I", str(tmp_path / "w2")]) == 2
    assert "a second merge named" in capsys.readouterr().err and not (tmp_path / "w2").exists()


def test_bare_file_inputs_and_a_model_without_config(tmp_path):
    """Intermediate outputs of bare safetensors inputs have no config.json: still found again."""
    (tmp_path / "inputs").mkdir()
    for name, value in (("x", 1.0), ("y", 3.0)):
        save_file({"w": torch.full((3, 2), value)}, str(tmp_path / "inputs" / f"{name}.safetensors"))
    documents = [{"name": "mid", "merge_method": "linear", "models": [
        {"model": str(tmp_path / "inputs" / "x.safetensors"), "parameters": {"weight": 0.5}},
        {"model": str(tmp_path / "inputs" / "y.safetensors"), "parameters": {"weight": 0.5}}]},
        {"merge_method": "linear", "models": [{"model": "mid", "parameters": {"weight": 2.0}}], "parameters": {"normalize": False}}]
    config = write_multi(tmp_path / "multi.yml", *documents)
    run_multi(config, tmp_path / "work", tmp_path / "out", quiet=True)
    assert torch.equal(load_dir(tmp_path / "out")["w"], torch.full((3, 2), 4.0))
    assert [s.report is None for s in run_multi(config, tmp_path / "work", tmp_path / "out", quiet=True)] == [True, True]
