"""tokenizer_source (base, union, model:<path>) and chat_template: the output vocabulary, the
embedding rows aligned to it with mergekit's fill rules, config.json's vocab_size, and the
tokenizer files written."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from _support import load_dir
from fastmerge import run
from fastmerge.cli import main
from fastmerge.demo import LlamaShape, fine_tune_of, make_state, write_checkpoint
from fastmerge.errors import ConfigError, MissingExtraError, PlanError
from fastmerge.vocab.chat_templates import NAMED_TEMPLATES

transformers = pytest.importorskip("transformers")

SMALL = LlamaShape(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=110)
BIG = replace(SMALL, vocab_size=118)  # the demo tokenizer's first 110 words, then 8 more
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _grown(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """`state` with 8 more vocabulary rows (new tokens appended, as when a tokenizer grows)."""
    extra = make_state(BIG, seed)
    return {k: torch.cat([v, extra[k][SMALL.vocab_size:]]) if k in VOCAB_TENSORS else v for k, v in state.items()}


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    base = make_state(SMALL, 0)
    return {
        "small": write_checkpoint(tmp_path / "small", base, SMALL, dtype=torch.float32),
        "big1": write_checkpoint(tmp_path / "big1", _grown(fine_tune_of(base, 1, 0.1), 11), BIG, dtype=torch.float32),
        "big2": write_checkpoint(tmp_path / "big2", _grown(fine_tune_of(base, 2, 0.1), 12), BIG, dtype=torch.float32),
    }


def _linear(a: Path, b: Path, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.25}}, {"model": str(b), "parameters": {"weight": 0.75}}], **extra}


def test_unset_source_refuses_different_vocab_sizes_naming_models(models, tmp_path):
    with pytest.raises(PlanError, match=r"small has 110, .*big1 has 118.*tokenizer_source.*--unsafe-truncate-embeddings"):
        run(_linear(models["small"], models["big1"]), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_unsafe_truncation_keeps_the_rows_every_model_has(models, tmp_path, capsys):
    """mergekit's --unsafe-truncate-embeddings: the first 110 rows of each, merged; config.json
    says 110 so the output loads; the report and `fastmerge plan` say what was cut."""
    report = run(_linear(models["small"], models["big1"]), tmp_path / "out", quiet=True, truncate_embeddings=True)
    small, big, merged = load_dir(models["small"]), load_dir(models["big1"]), load_dir(report.output_dir)
    for name in VOCAB_TENSORS:
        torch.testing.assert_close(merged[name], 0.25 * small[name] + 0.75 * big[name][:110])
    assert json.loads((report.output_dir / "config.json").read_text())["vocab_size"] == 110
    assert "note: model.embed_tokens.weight: truncated to the first 110 rows" in str(report)
    assert transformers.AutoModelForCausalLM.from_pretrained(str(report.output_dir)).get_input_embeddings().weight.shape[0] == 110
    config = tmp_path / "m.yml"
    config.write_text(json.dumps(_linear(models["small"], models["big1"])))
    assert main(["plan", str(config), "--unsafe-truncate-embeddings"]) == 0
    assert "note: lm_head.weight: truncated to the first 110 rows, which every input has (" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["base", "union", "model:big1", "big1"])
def test_prefix_vocabularies_merge_per_source(models, tmp_path, source):
    source = source.replace("big1", str(models["big1"]))
    out = run(_linear(models["small"], models["big1"], tokenizer_source=source), tmp_path / "out", quiet=True).output_dir
    small, big, merged = load_dir(models["small"]), load_dir(models["big1"]), load_dir(out)
    rows = 110 if source == "base" else 118
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == rows
    assert len(transformers.AutoTokenizer.from_pretrained(str(out))) == rows
    for name in VOCAB_TENSORS:
        assert merged[name].shape == (rows, SMALL.hidden_size)
        torch.testing.assert_close(merged[name][:110], 0.25 * small[name] + 0.75 * big[name][:110])
        # Tokens only big1 has: small takes big1's row (the only model with them), so the blend is big1's row.
        torch.testing.assert_close(merged[name][110:], big[name][110:rows])
    torch.testing.assert_close(merged["model.norm.weight"], 0.25 * small["model.norm.weight"] + 0.75 * big["model.norm.weight"])


def test_missing_rows_come_from_the_base_when_it_has_them(models, tmp_path):
    """Base big1, model small: small lacks the 8 new tokens, so its rows there are the base's
    and its task vector is zero on them; the merged rows are the base's."""
    config = {"merge_method": "task_arithmetic", "base_model": str(models["big1"]), "tokenizer_source": "union",
              "models": [{"model": str(models["small"]), "parameters": {"weight": 0.5}}]}
    out = run(config, tmp_path / "out", quiet=True).output_dir
    big, small, merged = load_dir(models["big1"]), load_dir(models["small"]), load_dir(out)
    for name in VOCAB_TENSORS:
        torch.testing.assert_close(merged[name][110:], big[name][110:])
        torch.testing.assert_close(merged[name][:110], big[name][:110] + 0.5 * (small[name] - big[name][:110]))


def test_rows_missing_from_the_base_are_the_mean_of_the_models_that_have_them(models, tmp_path):
    """Base small lacks tokens both fine-tunes have: the base's rows there are their mean."""
    config = {"merge_method": "task_arithmetic", "base_model": str(models["small"]), "tokenizer_source": "union",
              "models": [{"model": str(models[m]), "parameters": {"weight": w}} for m, w in (("big1", 0.3), ("big2", 0.6))]}
    out = run(config, tmp_path / "out", quiet=True).output_dir
    b1, b2, merged = load_dir(models["big1"]), load_dir(models["big2"]), load_dir(out)
    for name in VOCAB_TENSORS:
        filled = (b1[name][110:] + b2[name][110:]) / 2
        expected = filled + 0.3 * (b1[name][110:] - filled) + 0.6 * (b2[name][110:] - filled)
        torch.testing.assert_close(merged[name][110:], expected)


def _reordered_copy(source: Path, destination: Path, swaps: list[tuple[int, int]]) -> Path:
    """The same model with some token ids exchanged, in the tokenizer and in the embedding rows."""
    state = load_dir(source)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    by_id = {i: w for w, i in vocab.items()}
    order = torch.arange(SMALL.vocab_size)
    for a, b in swaps:
        vocab[by_id[a]], vocab[by_id[b]] = b, a
        order[a], order[b] = order[b].item(), order[a].item()
    state = {k: v[order] if k in VOCAB_TENSORS else v for k, v in state.items()}
    write_checkpoint(destination, state, SMALL, dtype=torch.float32)
    (destination / "tokenizer.json").write_text(json.dumps(tokenizer))
    return destination


def test_rows_are_reindexed_by_token_not_by_position(models, tmp_path):
    """Two models with the same tokens under different ids merge token by token; with the
    reordered model as the source, the output follows its ids."""
    reordered = _reordered_copy(models["small"], tmp_path / "reordered", [(40, 90), (5, 6)])
    for source, expected in (("base", models["small"]), (f"model:{reordered}", reordered)):
        out = run(_linear(models["small"], reordered, tokenizer_source=source), tmp_path / "out", quiet=True, overwrite=True).output_dir
        for name in VOCAB_TENSORS:
            torch.testing.assert_close(load_dir(out)[name], load_dir(expected)[name])


def test_same_vocabulary_output_is_byte_identical_to_unset(models, tmp_path):
    config = _linear(models["big1"], models["big2"])
    plain = run(config, tmp_path / "plain", quiet=True).output_dir
    based = run({**config, "tokenizer_source": "base"}, tmp_path / "based", quiet=True).output_dir
    for shard in plain.glob("*.safetensors"):
        assert (based / shard.name).read_bytes() == shard.read_bytes()


def test_other_dimensions_must_match(models, tmp_path):
    wide = replace(BIG, hidden_size=24, num_attention_heads=3)
    other = write_checkpoint(tmp_path / "wide", make_state(wide, 3), wide, dtype=torch.float32)
    with pytest.raises(PlanError, match="more than its vocabulary rows"):
        run(_linear(models["big1"], other, tokenizer_source="union"), tmp_path / "out", quiet=True)


@pytest.mark.parametrize("bad", ["", 3, "model:"])
def test_malformed_tokenizer_source_is_a_config_error(models, tmp_path, bad):
    with pytest.raises(ConfigError, match="tokenizer_source"):
        run(_linear(models["big1"], models["big2"], tokenizer_source=bad), tmp_path / "out", quiet=True)


def test_unknown_tokenizer_model_is_a_config_error(models, tmp_path):
    with pytest.raises(ConfigError, match="nowhere"):
        run(_linear(models["big1"], models["big2"], tokenizer_source=str(tmp_path / "nowhere")), tmp_path / "out", quiet=True)


def test_without_transformers_a_missing_extra_error(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"fastmerge\[models\]"):
        run(_linear(models["small"], models["big1"], tokenizer_source="union"), tmp_path / "out", quiet=True)


@pytest.mark.parametrize("source", [None, "union"])
def test_named_chat_template_is_written_to_tokenizer_config(models, tmp_path, source):
    extra = {"chat_template": "chatml"} | ({"tokenizer_source": source} if source else {})
    out = run(_linear(models["big1"], models["big2"], **extra), tmp_path / "out", quiet=True).output_dir
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == NAMED_TEMPLATES["chatml"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_literal_and_auto_chat_templates(models, tmp_path):
    literal = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    out = run(_linear(models["big1"], models["big2"], chat_template=literal), tmp_path / "lit", quiet=True).output_dir
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == literal
    config_path = models["big2"] / "tokenizer_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"chat_template": literal}))
    out = run(_linear(models["big1"], models["big2"], chat_template="auto"), tmp_path / "auto", quiet=True).output_dir
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == literal


@pytest.mark.parametrize("bad", ["chatmll", "{{ x }}"])
def test_unknown_chat_template_is_a_config_error(models, tmp_path, bad):
    with pytest.raises(ConfigError, match="chat_template"):
        run(_linear(models["big1"], models["big2"], chat_template=bad), tmp_path / "out", quiet=True)


# -- the tokenizer: block ---------------------------------------------------------------------


def _aligned(own: torch.Tensor, donor: torch.Tensor) -> torch.Tensor:
    """A model's rows in the 118-token union: its own, then the donor's for the tokens only the
    donor has (the only model with them)."""
    return torch.cat([own[:110], donor[110:118]]) if own.shape[0] == 110 else own.clone()


def test_the_tokenizer_block_sets_rows_per_token_and_pads(models, tmp_path):
    """source union; w13 (only big1 has it) zero where missing; w0 forced to small's row in both
    models; a new token <new> from big1's w20 row in both; w1 configured but present everywhere
    and not forced, so unchanged; 119 tokens padded to 128 rows, each model's padding the mean of
    its aligned rows."""
    block = {"source": "union", "pad_to_multiple_of": 16, "tokens": {
        "w13": {"source": {"kind": "zero"}},
        "w0": {"source": str(models["small"]), "force": True},
        "<new>": {"source": {"kind": "model_token", "model": str(models["big1"]), "token": "w20"}},
        "w1": {"source": {"kind": "model_token", "model": str(models["small"]), "token_id": 5}},
    }}
    out = run(_linear(models["small"], models["big1"], tokenizer=block), tmp_path / "out", quiet=True).output_dir
    small, big, merged = load_dir(models["small"]), load_dir(models["big1"]), load_dir(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == 119 and tokenizer.get_vocab()["<new>"] == 118
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128
    for name in VOCAB_TENSORS:
        rows = []
        for own in (small[name], big[name]):
            r = _aligned(own, big[name])
            if own.shape[0] == 110:
                r[110] = 0.0  # w13: small lacks it
            r[97] = small[name][97]  # w0, forced
            r = torch.cat([r, big[name][117:118]])  # <new> = big1's w20
            rows.append(torch.cat([r, r.mean(dim=0).expand(9, -1)]))
        assert merged[name].shape == (128, SMALL.hidden_size)
        torch.testing.assert_close(merged[name], 0.25 * rows[0] + 0.75 * rows[1])


def test_the_tokenizer_block_on_its_own_is_a_union(models, tmp_path):
    with_block = run(_linear(models["small"], models["big1"], tokenizer={}), tmp_path / "a", quiet=True).output_dir
    with_source = run(_linear(models["small"], models["big1"], tokenizer_source="union"), tmp_path / "b", quiet=True).output_dir
    for shard in with_source.glob("*.safetensors"):
        assert (with_block / shard.name).read_bytes() == shard.read_bytes()


@pytest.mark.parametrize("block, error", [
    ("union", "must be a mapping"),
    ({"sourc": "union"}, r"`tokenizer.sourc` is not a tokenizer option"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of` must be a positive integer"),
    ({"tokens": {"w1": {"source": {"kind": "random"}}}}, r"tokens\['w1'\]`.source must be"),
    ({"tokens": {"w1": {"source": {"kind": "zero"}, "force": "yes"}}}, "force must be true or false"),
    ({"tokens": {"w1": {"source": {"kind": "model_token", "model": "m", "token_id": 1, "token": "x"}}}}, "exactly one of token_id and token"),
    ({"tokens": {"w1": {"source": {"kind": "model_token", "model": "m", "token_id": -1}}}}, "token_id must be an integer >= 0"),
])
def test_a_malformed_tokenizer_block_is_a_config_error(models, tmp_path, block, error):
    with pytest.raises(ConfigError, match=error):
        run(_linear(models["small"], models["big1"], tokenizer=block), tmp_path / "out", quiet=True)
    with pytest.raises(ConfigError, match="not both"):
        run(_linear(models["small"], models["big1"], tokenizer={}, tokenizer_source="union"), tmp_path / "out", quiet=True)


@pytest.mark.parametrize("token, error", [
    ({"w13": {"source": "OTHER"}}, r"tokens\['w13'\] \(tensor .*\): its source .*big2 is not one of this tensor's models"),
    ({"w13": {"source": "SMALL"}}, r"tokens\['w13'\] .*the source .*small does not have the token"),
    ({"w13": {"source": {"kind": "model_token", "model": "SMALL", "token": "w19"}}}, r"'w19' is not in the tokenizer of .*small"),
    ({"w13": {"source": {"kind": "model_token", "model": "SMALL", "token_id": 110}}}, r"row 110 is beyond the 110 rows of .*small"),
])
def test_a_token_source_that_cannot_be_read_is_a_plan_error(models, tmp_path, token, error):
    names = {"OTHER": str(models["big2"]), "SMALL": str(models["small"])}
    token = json.loads(json.dumps(token).replace('"OTHER"', json.dumps(names["OTHER"])).replace('"SMALL"', json.dumps(names["SMALL"])))
    with pytest.raises(PlanError, match=error):
        run(_linear(models["small"], models["big1"], tokenizer={"tokens": token}), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_padding_rows_are_the_fp32_mean_rounded_once(dtype):
    from fastmerge.vocab.align import pad_rows

    rows = (torch.randn(7, 5, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    padded = pad_rows(rows, 16)
    mean = rows.double().sum(dim=0) / 7
    assert padded.dtype == dtype and torch.equal(padded[:7], rows)
    if dtype == torch.float32:  # fp32 sums: within rounding of the exact mean
        torch.testing.assert_close(padded[7:].double(), mean.expand(9, -1), rtol=1e-6, atol=1e-6)
    else:  # half precisions: the exact mean rounded once (fp32 sums of 7 are exact enough)
        assert torch.equal(padded[7:], mean.to(dtype).expand(9, -1))
    assert pad_rows(rows, 7) is rows
