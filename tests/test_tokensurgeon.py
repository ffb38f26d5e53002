"""fastmerge tokensurgeon: a model given a donor's tokenizer. Row matching (exact, byte, prefix),
each approximation method against formulas written here, the output layout (config.json,
tokenizer, untouched tensors), errors, and parity with mergekit-tokensurgeon 0.1.5 (skipped
unless mergekit is installed; see _support.mergekit_script)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _support import load_dir, mergekit_script
from fastmerge import tokensurgeon
from fastmerge.cli import main, mergekit_tokensurgeon_main
from fastmerge.demo import LlamaShape, make_state, write_checkpoint
from fastmerge.errors import CheckpointError, ConfigError
from fastmerge.surgery.approximate import Rows, _john_hewitt, common_interpolation, orthogonal_matching_pursuit
from fastmerge.surgery.matching import assign_rows
from fastmerge.surgery.vocabulary import SPECIAL, WORD_START, prefixes

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
MODEL_TOKENS = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e", "f", "ab", "abc", "cd", "<0x41>", "Ġa", "Ġab", "x", "y", "z"]
# The donor's eos is another string at another id; "A" and "<0x62>" are byte matches, "abcd"
# and "Ġabx" prefix matches; "de", "q", "r", "xy" are new.
DONOR_TOKENS = ["<unk>", "<|end|>", "<s>", "a", "b", "c", "d", "e", "A", "<0x62>", "ab", "abcd", "de", "Ġa", "Ġabx",
                "q", "r", "cd", "xy", "z"]
SHARED = ["<unk>", "<|end|>", "<s>", "a", "b", "c", "d", "e", "ab", "Ġa", "cd", "z"]  # donor spelling
MODEL_ROW = {"<|end|>": MODEL_TOKENS.index("</s>")} | {t: MODEL_TOKENS.index(t) for t in SHARED if t in MODEL_TOKENS}
NEW = [t for t in DONOR_TOKENS if t not in SHARED]


def _tokenizer(directory: Path, tokens: list[str], eos: str) -> None:
    """A BPE tokenizer with exactly `tokens` (ids in order); multi-character tokens are merges of
    their first characters and last one, so the model splits "de" into "d", "e"."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [(t[:-1], t[-1]) for t in tokens if len(t) > 1 and t[:-1] in vocab and t[-1] in vocab and "<" not in t]
    model = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token=eos, unk_token="<unk>")
    fast.save_pretrained(str(directory))


def _model(directory: Path, tokens: list[str], eos: str, hidden: int, seed: int, rows: int | None = None,
           tied: bool = False, dtype: torch.dtype = torch.float32, edit=None) -> Path:
    shape = LlamaShape(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=rows or len(tokens), tie_word_embeddings=tied)
    state = make_state(shape, seed)
    if edit is not None:
        edit(state)
    write_checkpoint(directory, state, shape, dtype=dtype, tokenizer=False)
    _tokenizer(directory, tokens, eos)
    return directory


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A model (hidden 8, 3 padding rows beyond its tokenizer) and a donor (hidden 16)."""
    return (_model(tmp_path / "model", MODEL_TOKENS, "</s>", 8, 0, rows=len(MODEL_TOKENS) + 3),
            _model(tmp_path / "donor", DONOR_TOKENS, "<|end|>", 16, 1))


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _row(tensor: torch.Tensor, token: str) -> torch.Tensor:
    return tensor[DONOR_TOKENS.index(token)]


def test_copies_shared_rows_keeps_other_tensors_and_writes_donor_tokenizer_and_config(pair, tmp_path):
    model, donor = pair
    before = _digest(model) | {f"donor/{k}": v for k, v in _digest(donor).items()}
    report = tokensurgeon(model, donor, tmp_path / "out", k=2, quiet=True)
    assert _digest(model) | {f"donor/{k}": v for k, v in _digest(donor).items()} == before  # inputs never written
    ours, original = load_dir(report.output_dir), load_dir(model)
    assert sorted(ours) == sorted(original)
    for name, tensor in original.items():
        if name not in (EMBED, HEAD):
            assert torch.equal(ours[name], tensor), name
    for name in (EMBED, HEAD):
        assert ours[name].shape == (len(DONOR_TOKENS), 8) and ours[name].dtype == torch.float32
        for token, row in MODEL_ROW.items():  # eos by role: the donor's <|end|> gets the model's </s>
            assert torch.equal(_row(ours[name], token), original[name][row]), (name, token)
        assert report.rows[name] == {"exact": len(SHARED), "byte": 0, "prefix": 0, "approximated": len(NEW)}
    config = json.loads((report.output_dir / "config.json").read_text())
    assert config["vocab_size"] == len(DONOR_TOKENS)
    assert (config["eos_token_id"], config["bos_token_id"]) == (2, 1)  # the donor's config (demo: bos 1, eos 2)
    assert config["hidden_size"] == 8 and config["num_hidden_layers"] == 1
    loaded = transformers.AutoTokenizer.from_pretrained(str(report.output_dir))
    assert loaded.get_vocab() == {t: i for i, t in enumerate(DONOR_TOKENS)} and loaded.eos_token == "<|end|>"
    assert transformers.AutoModelForCausalLM.from_pretrained(str(report.output_dir)).get_input_embeddings().weight.shape == (20, 8)


def test_omp_picks_the_atoms_of_an_exact_combination():
    """Orthogonal atoms: the greedy picks are the two with the largest coefficients, and the
    least-squares fit recovers the coefficients; a third pick adds a zero coefficient."""
    atoms = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(3)))[0][:9] * 2
    target = (3.0 * atoms[4] - 0.5 * atoms[7]).unsqueeze(0)
    picked, coefficients = orthogonal_matching_pursuit(target, atoms, 2)
    assert picked.tolist() == [[4, 7]]
    torch.testing.assert_close(coefficients, torch.tensor([[3.0, -0.5]]), atol=1e-5, rtol=0)
    picked, coefficients = orthogonal_matching_pursuit(target, atoms, 3)
    assert picked[0, :2].tolist() == [4, 7] and abs(coefficients[0, 2].item()) < 1e-5


def test_omp_end_to_end_carries_the_donor_combination_to_the_model_rows(tmp_path):
    """A new donor token whose donor row is 2 x row(b) - 0.5 x row(cd): with k = the 12 shared
    tokens (linearly independent in 16 dimensions, so the fit is unique) its new row is the same
    combination of the model's rows."""
    def edit(state):
        for name in (EMBED, HEAD):
            table = state[name]
            table[DONOR_TOKENS.index("q")] = 2 * table[DONOR_TOKENS.index("b")] - 0.5 * table[DONOR_TOKENS.index("cd")]

    model = _model(tmp_path / "model", MODEL_TOKENS, "</s>", 8, 0)
    donor = _model(tmp_path / "donor", DONOR_TOKENS, "<|end|>", 16, 1, edit=edit)
    out = load_dir(tokensurgeon(model, donor, tmp_path / "out", k=len(SHARED), batch_size=3, quiet=True).output_dir)
    original = load_dir(model)
    for name in (EMBED, HEAD):
        expected = 2 * original[name][MODEL_ROW["b"]].double() - 0.5 * original[name][MODEL_ROW["cd"]].double()
        # fp32 least squares over 12 atoms: a few ulp of the coefficients
        torch.testing.assert_close(_row(out[name], "q").double(), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("cosine", [False, True])
def test_common_interpolation_distance_proportional_matches_the_formula(cosine):
    generator = torch.Generator().manual_seed(5)
    points, targets = torch.randn(10, 6, generator=generator), torch.randn(3, 6, generator=generator)
    nearest, weights = common_interpolation(targets, points, 4, cosine, "distance_proportional")
    for b in range(3):
        t = targets[b].double()
        if cosine:
            distance = [1 - float(t @ p.double() / (t.norm() * p.double().norm())) for p in points]
        else:
            distance = [float((t - p.double()).norm()) for p in points]
        order = sorted(range(10), key=distance.__getitem__)[:4]
        assert sorted(nearest[b].tolist()) == sorted(order)
        closeness = {i: (1 - distance[i]) if cosine else 1 / distance[i] for i in order}
        total = sum(closeness.values())
        for j, i in enumerate(nearest[b].tolist()):
            assert weights[b, j].item() == pytest.approx(closeness[i] / total, rel=1e-5)


def test_common_interpolation_barycentric_and_least_squares():
    generator = torch.Generator().manual_seed(6)
    points = torch.randn(8, 6, generator=generator)
    # a target in the affine hull of 5 points is reproduced by weights summing to 1 (k = all 5)
    target = (0.5 * points[1] + 0.8 * points[3] - 0.3 * points[4]).unsqueeze(0)
    nearest, weights = common_interpolation(target, points[:5], 5, False, "barycentric")
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(weights @ points[:5][nearest[0]], target, atol=1e-4, rtol=0)
    expected = dict(zip(nearest[0].tolist(), weights[0].tolist()))
    assert [round(expected[i], 4) for i in range(5)] == [0.0, 0.5, 0.0, 0.8, -0.3]
    # least squares: the normal equations' solution, in fp64 here
    target = torch.randn(1, 6, generator=generator)
    nearest, weights = common_interpolation(target, points, 4, False, "least_squares")
    chosen = points[nearest[0]].double()
    expected = torch.linalg.solve(chosen @ chosen.T, chosen @ target[0].double())
    torch.testing.assert_close(weights[0].double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["mean", "zero"])
def test_mean_and_zero_rows(pair, tmp_path, method):
    model, donor = pair
    out = load_dir(tokensurgeon(model, donor, tmp_path / "out", method=method, quiet=True).output_dir)
    original = load_dir(model)
    for name in (EMBED, HEAD):
        expected = original[name].mean(dim=0) if method == "mean" else torch.zeros(8)  # all rows, padding too
        for token in NEW + ["A", "<0x62>", "abcd", "Ġabx"]:
            assert torch.equal(_row(out[name], token), expected), (name, token)


@pytest.mark.parametrize("how", ["mean", "sum", "weighted_mean", "first_last"])
def test_subword_combines_the_model_pieces(pair, tmp_path, how):
    """"de" is d + e and "xy" is x + y for the model's tokenizer; "q" and "r" it cannot split
    (<unk>, one piece)."""
    model, donor = pair
    out = load_dir(tokensurgeon(model, donor, tmp_path / "out", method="subword", subword_method=how, quiet=True).output_dir)
    original = load_dir(model)
    for name in (EMBED, HEAD):
        lm_head = name == HEAD
        for token, pieces in (("de", "de"), ("xy", "xy"), ("q", ["<unk>"])):
            rows = [original[name][MODEL_TOKENS.index(p)] for p in pieces]
            first, last = rows[0], rows[-1]
            if len(rows) == 1:
                expected = rows[0]
            elif how == "mean":
                expected = (first + last) / 2
            elif how == "sum":
                expected = first + last
            elif how == "weighted_mean":  # the first piece weighs 2 for lm_head, the last for the embedding
                expected = ((2 * first + last) if lm_head else (first + 2 * last)) / 3
            else:
                expected = first if lm_head else last
            torch.testing.assert_close(_row(out[name], token), expected, atol=1e-6, rtol=0)


def test_matching_rules():
    model = {"a": 0, "b": 1, "abc": 2, "<0x41>": 3, (WORD_START, "ab"): 4, (SPECIAL, "eos_token"): 5, "zz": 99}
    donor = {"A": 0, "<0x62>": 1, "abcd": 2, (WORD_START, "abx"): 3, (SPECIAL, "eos_token"): 4, "a b": 5, "zz": 6, "q": 7}
    plain = assign_rows(model, donor, model_rows=6, donor_rows=8, allow_byte=False, allow_prefix=False)
    assert plain.copies == {4: 5} and plain.approximate == ["A", "<0x62>", "abcd", (WORD_START, "abx"), "a b", "zz", "q"]
    full = assign_rows(model, donor, model_rows=6, donor_rows=7, allow_byte=True, allow_prefix=True)
    # byte both ways; the longest prefix with the same marker; "zz" has id 99 >= 6 model rows;
    # "q" (id 7) has no donor row and is neither copied nor approximated
    assert full.copies == {0: 3, 1: 1, 2: 2, 3: 4, 4: 5, 5: 0}
    assert full.approximate == ["zz"] and full.counts == {"exact": 1, "byte": 2, "prefix": 3, "approximated": 1}
    assert list(prefixes("a bc")) == ["a b", "a ", "a"] and list(prefixes((WORD_START, "abc"))) == [(WORD_START, "ab"), (WORD_START, "a")]
    assert list(prefixes(" ab")) == [" a"] and list(prefixes("  xy")) == ["  x"]  # no blank prefix
    assert list(prefixes((SPECIAL, "eos_token"))) == []


def test_match_flags_apply_per_tensor(pair, tmp_path):
    model, donor = pair
    report = tokensurgeon(model, donor, tmp_path / "out", method="zero", prefix_match="lm_head", byte_match="embed", quiet=True)
    out, original = load_dir(report.output_dir), load_dir(model)
    assert report.rows[EMBED] == {"exact": 12, "byte": 2, "prefix": 0, "approximated": 6}
    assert report.rows[HEAD] == {"exact": 12, "byte": 0, "prefix": 4, "approximated": 4}
    assert torch.equal(_row(out[EMBED], "A"), original[EMBED][MODEL_TOKENS.index("<0x41>")])
    assert torch.equal(_row(out[HEAD], "abcd"), original[HEAD][MODEL_TOKENS.index("abc")])
    assert torch.equal(_row(out[HEAD], "Ġabx"), original[HEAD][MODEL_TOKENS.index("Ġab")])
    assert torch.equal(_row(out[EMBED], "abcd"), torch.zeros(8)) and torch.equal(_row(out[HEAD], "A"), torch.zeros(8))


def test_random_methods_are_seeded_and_noise_and_scale_apply(pair, tmp_path):
    model, donor = pair
    runs = {}
    for key, kwargs in {"a": dict(method="randn", seed=1), "b": dict(method="randn", seed=1), "c": dict(method="randn", seed=2),
                        "scaled": dict(method="mean", new_vocab_scale=0.5), "noisy": dict(method="mean", new_vocab_noise=0.1)}.items():
        runs[key] = load_dir(tokensurgeon(model, donor, tmp_path / key, quiet=True, **kwargs).output_dir)
    assert torch.equal(runs["a"][EMBED], runs["b"][EMBED]) and not torch.equal(runs["a"][EMBED], runs["c"][EMBED])
    mean = load_dir(model)[EMBED].mean(dim=0)
    assert torch.equal(_row(runs["scaled"][EMBED], "q"), mean * 0.5)
    noise = _row(runs["noisy"][EMBED], "q") - mean
    assert 0 < noise.abs().max().item() < 1 and torch.equal(_row(runs["noisy"][EMBED], "a"), _row(runs["scaled"][EMBED], "a"))


def test_john_hewitt_draws_from_the_rows_mean_and_covariance():
    generator = torch.Generator().manual_seed(7)
    mixing = torch.randn(4, 4, generator=generator)
    table = torch.randn(500, 4, generator=generator) @ mixing + torch.tensor([1.0, -2.0, 0.5, 3.0])
    rows = Rows(table, table, {}, {}, False, None, torch.Generator().manual_seed(0), torch.device("cpu"), EMBED)
    drawn = _john_hewitt(rows)(["t"] * 20000).double()
    torch.testing.assert_close(drawn.mean(dim=0), table.double().mean(dim=0), atol=0.1, rtol=0)
    centered = table.double() - table.double().mean(dim=0)
    torch.testing.assert_close(torch.cov(drawn.T, correction=0), centered.T @ centered / 500, atol=0.15, rtol=0.05)


def test_tied_model_stays_tied_and_tied_donor_lends_its_embedding(tmp_path):
    def edit(state):
        table = state[EMBED]
        table[DONOR_TOKENS.index("q")] = table[DONOR_TOKENS.index("a")] + table[DONOR_TOKENS.index("e")]

    tied = _model(tmp_path / "tied", MODEL_TOKENS, "</s>", 8, 0, tied=True)
    untied = _model(tmp_path / "untied", MODEL_TOKENS, "</s>", 8, 0)
    donor = _model(tmp_path / "donor", DONOR_TOKENS, "<|end|>", 16, 1, tied=True, edit=edit)
    report = tokensurgeon(tied, donor, tmp_path / "out1", k=len(SHARED), quiet=True)
    assert HEAD not in load_dir(report.output_dir) and "tied" in str(report)
    out = load_dir(tokensurgeon(untied, donor, tmp_path / "out2", k=len(SHARED), quiet=True).output_dir)
    original = load_dir(untied)[HEAD]
    torch.testing.assert_close(_row(out[HEAD], "q"), original[MODEL_ROW["a"]] + original[MODEL_ROW["e"]], atol=2e-5, rtol=0)


def test_bfloat16_model_gives_bfloat16_rows(tmp_path):
    model = _model(tmp_path / "model", MODEL_TOKENS, "</s>", 8, 0, dtype=torch.bfloat16)
    donor = _model(tmp_path / "donor", DONOR_TOKENS, "<|end|>", 16, 1, dtype=torch.bfloat16)
    out = load_dir(tokensurgeon(model, donor, tmp_path / "out", k=4, quiet=True).output_dir)
    assert out[EMBED].dtype == torch.bfloat16 and torch.equal(_row(out[EMBED], "a"), load_dir(model)[EMBED][MODEL_ROW["a"]])


def test_output_bias_keeps_exact_matches_and_zeros_the_rest(tmp_path):
    def edit(state):
        state["lm_head.bias"] = torch.arange(len(MODEL_TOKENS), dtype=torch.float32) + 1

    model = _model(tmp_path / "model", MODEL_TOKENS, "</s>", 8, 0, edit=edit)
    donor = _model(tmp_path / "donor", DONOR_TOKENS, "<|end|>", 16, 1)
    out = load_dir(tokensurgeon(model, donor, tmp_path / "out", method="zero", prefix_match="yes", quiet=True).output_dir)
    expected = [float(MODEL_ROW[t] + 1) if t in MODEL_ROW else 0.0 for t in DONOR_TOKENS]  # prefix matches not used
    assert out["lm_head.bias"].tolist() == expected


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(k=0), ConfigError, r"--k must be a positive integer"),
    (dict(k=13), ConfigError, r"--k 13: the two tokenizers share only 12 tokens"),
    (dict(method="nearest"), ConfigError, r"unknown approximation method 'nearest'.*omp, common_interpolation"),
    (dict(method="landmark_pca"), ConfigError, r"'landmark_pca' is not implemented in fastmerge; use one of omp, "),
    (dict(method="common_interpolation", weight_scheme="cubic"), ConfigError, r"--weight-scheme 'cubic'"),
    (dict(prefix_match="maybe"), ConfigError, r"--prefix-match 'maybe'"),
])
def test_bad_settings_are_config_errors_and_write_nothing(pair, tmp_path, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        tokensurgeon(*pair, tmp_path / "out", quiet=True, **kwargs)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_missing_embedding_names_the_donor(pair, tmp_path):
    model, _ = pair
    donor = tmp_path / "bare"
    donor.mkdir()
    shape = LlamaShape(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       vocab_size=len(DONOR_TOKENS))
    state = {k: v for k, v in make_state(shape, 1).items() if k != EMBED}
    write_checkpoint(donor, state, shape, dtype=torch.float32, tokenizer=False)
    _tokenizer(donor, DONOR_TOKENS, "<|end|>")
    with pytest.raises(CheckpointError, match=rf"{donor}: no input embedding tensor"):
        tokensurgeon(model, donor, tmp_path / "out", quiet=True)


def test_cli_and_drop_in(pair, tmp_path, capsys):
    model, donor = pair
    assert main(["tokensurgeon", str(model), str(donor), str(tmp_path / "out"), "-a", "stb"]) == 2
    assert "'stb' is not implemented in fastmerge" in capsys.readouterr().err
    assert main(["tokensurgeon", str(model), str(donor), str(tmp_path / "out"), "--magikarp"]) == 2
    assert "--magikarp" in capsys.readouterr().err
    assert mergekit_tokensurgeon_main([str(model), str(donor), str(tmp_path / "out"), "-a", "common_interpolation", "-k", "3",
                                       "-c", "-pm", "yes", "--random-seed", "4", "--no-write-model-card", "--device", "cpu",
                                       "--quiet"]) == 0
    assert "gave the model the donor's tokenizer (20 tokens" in capsys.readouterr().out
    command = [sys.executable, "-c", "import sys; from fastmerge.console import fastmerge_tokensurgeon; "
               "sys.argv[0] = 'fastmerge-tokensurgeon'; fastmerge_tokensurgeon()", str(model), str(tmp_path / "nope"), str(tmp_path / "o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and f"DONOR {tmp_path / 'nope'}: not a model directory" in result.stderr


# -- parity with mergekit-tokensurgeon 0.1.5 ----------------------------------------------------

MERGEKIT = mergekit_script("mergekit-tokensurgeon")
# (our flags, mergekit's flags, byte-identical?). mergekit swaps the per-tensor match flags
# (its `lm_head` choice matches in the input embedding), so ours name the tensor they mean.
PARITY = [
    (["-a", "mean"], None, True),
    (["-a", "zero", "-pm", "yes", "-bm", "yes"], None, True),
    (["-a", "subword", "-s", "mean"], None, True),
    (["-a", "common_interpolation", "-k", "4", "-c"], None, True),
    (["-a", "mean", "-pm", "lm_head", "-bm", "embed"], ["-a", "mean", "-pm", "embed", "-bm", "lm_head"], True),
    (["-a", "omp", "-k", "5"], None, False),
    (["-a", "common_interpolation", "-k", "4", "-w", "barycentric"], None, False),
    (["-a", "common_interpolation", "-k", "4", "-w", "least_squares"], None, False),
]


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-tokensurgeon not installed (set FASTMERGE_MERGEKIT_YAML)")
@pytest.mark.parametrize("ours, theirs, exact", PARITY, ids=[" ".join(p[0]) for p in PARITY])
def test_parity_with_mergekit(pair, tmp_path, ours, theirs, exact):
    """Copies, mean, zero, subword and distance-weighted interpolation: mergekit's bytes. omp and
    the least-squares weightings solve small systems in another order (Gram-Schmidt twice, a
    different lstsq call), so there each value is within 1e-6 of the tensor's largest |value|
    (a few fp32 ulp). The config as transformers reads it is the same."""
    model, donor = pair
    assert main(["tokensurgeon", str(model), str(donor), str(tmp_path / "ours"), "--device", "cpu", "--quiet", *ours]) == 0
    subprocess.run([MERGEKIT, str(model), str(donor), str(tmp_path / "mk"), "--device", "cpu", "--no-write-model-card",
                    *(theirs or ours)], check=True, capture_output=True)
    mine, reference = load_dir(tmp_path / "ours"), load_dir(tmp_path / "mk")
    assert sorted(mine) == sorted(reference)
    for name, expected in reference.items():
        assert mine[name].dtype == expected.dtype and mine[name].shape == expected.shape, name
        if exact or name not in (EMBED, HEAD):
            assert torch.equal(mine[name], expected), name
        else:
            bound = 1e-6 * expected.abs().max().item()
            assert (mine[name].double() - expected.double()).abs().max().item() <= bound, name
    configs = [transformers.AutoConfig.from_pretrained(str(tmp_path / d)).to_dict() for d in ("ours", "mk")]
    for config in configs:
        config.pop("_name_or_path", None)
    assert configs[0] == configs[1]
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours")).get_vocab() == \
        transformers.AutoTokenizer.from_pretrained(str(tmp_path / "mk")).get_vocab()
