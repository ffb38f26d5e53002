"""fastmerge tokensurgeon: a model given a donor's tokenizer. Row matching (exact, byte, prefix),
each approximation method against formulas written here, the output layout (config.json,
tokenizer, untouched tensors), errors, and parity with mergekit-tokensurgeon 0.1.5 (skipped
unless mergekit is installed; see _support.mergekit_script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _support import load_dir, mergekit_script, snapshot
from fastmerge import tokensurgeon
from fastmerge.cli import main, mergekit_tokensurgeon_main
from fastmerge.demo import LlamaShape, make_state, write_checkpoint
from fastmerge.errors import CheckpointError, ConfigError
from fastmerge.io.checkpoint import Checkpoint
from fastmerge.surgery.affine import landmark_pca, sparse_token_basis
from fastmerge.surgery.approximate import Rows, _john_hewitt, common_interpolation
from fastmerge.surgery.magikarp import well_trained_tokens
from fastmerge.surgery.matching import assign_rows
from fastmerge.surgery.moments import cross_gram, mean64
from fastmerge.surgery.pursuit import orthogonal_matching_pursuit
from fastmerge.surgery.rope import Rotary, matching_pursuit_rope
from fastmerge.surgery.transplant import _rotary, _Tensors
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


def _row(tensor: torch.Tensor, token: str) -> torch.Tensor:
    return tensor[DONOR_TOKENS.index(token)]


def test_copies_shared_rows_keeps_other_tensors_and_writes_donor_tokenizer_and_config(pair, tmp_path):
    model, donor = pair
    before = snapshot(model) | {f"donor/{k}": v for k, v in snapshot(donor).items()}
    report = tokensurgeon(model, donor, tmp_path / "out", k=2, quiet=True)
    assert snapshot(model) | {f"donor/{k}": v for k, v in snapshot(donor).items()} == before  # inputs never written
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


def _isometry(rows: int, columns: int, seed: int) -> torch.Tensor:
    """A (rows, columns) matrix with orthonormal columns (rows >= columns)."""
    return torch.linalg.qr(torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0].float()


def test_landmark_pca_reproduces_a_rotated_and_translated_space():
    """The model's space is the donor's rotated (an isometry) and moved: the donor rows of 30
    landmarks and 3 targets are the model's mapped into a 16-dimensional space, so the map must
    send each target back to the model row it came from. Then the case mergekit's transposed
    rotation gets wrong: landmarks with equal variance in every direction (no preferred
    principal axes), the model a general rotation of them."""
    generator = torch.Generator().manual_seed(11)
    lift = _isometry(16, 8, 1)
    model = torch.randn(30, 8, generator=generator) * torch.arange(1, 9)  # distinct variances
    targets = torch.randn(3, 8, generator=generator)
    to_donor = lambda x: (x - 0.5) @ lift.T + 2.0  # noqa: E731
    mapping = landmark_pca(to_donor(model), model)
    torch.testing.assert_close(mapping.apply(to_donor(targets)), targets, atol=1e-5, rtol=0)
    axes = _isometry(6, 6, 2)
    donor = torch.cat([axes, -axes]) * 3  # centered, covariance 3 * I
    rotation = _isometry(6, 6, 3)
    points = torch.randn(4, 6, generator=generator)
    mapping = landmark_pca(donor, donor @ rotation + 1.0)
    torch.testing.assert_close(mapping.apply(points), points @ rotation + 1.0, atol=1e-5, rtol=0)


def test_sparse_token_basis_recovers_targets_in_the_basis_span():
    """Donor space smaller (6 < 9): the model's rows are an affine map of the donor's, and every
    donor row is in the span of the (full-rank) donor basis, so the map comes through exactly.
    Donor space larger (9 > 6): the donor rows lie in the 6-dimensional image of the model's
    space; a target in that span is sent back to its model row, and a component of the target
    outside the span (orthogonal to every donor row) is dropped by the least-squares fit."""
    generator = torch.Generator().manual_seed(12)
    linear, points = torch.randn(6, 9, generator=generator, dtype=torch.float64).float(), torch.randn(4, 6, generator=generator)
    donor = torch.randn(40, 6, generator=generator)
    mapping = sparse_token_basis(donor, donor @ linear + 0.3, k=4, batch_size=512)
    torch.testing.assert_close(mapping.apply(points), points @ linear + 0.3, atol=1e-4, rtol=0)
    embed = _isometry(9, 9, 4)
    lift, outside = embed[:, :6].T * 2, embed[:, 8]  # (6, 9) full row rank; a unit vector orthogonal to its rows
    model = torch.randn(40, 6, generator=generator)
    mapping = sparse_token_basis(model @ lift - 1.0, model, k=3, batch_size=2)  # OMP over directions in batches of 2
    torch.testing.assert_close(mapping.apply(points @ lift - 1.0), points, atol=1e-4, rtol=0)
    torch.testing.assert_close(mapping.apply(points @ lift - 1.0 + 5 * outside), points, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["landmark_pca", "stb"])
def test_affine_methods_end_to_end_send_lifted_rows_back(tmp_path, method):
    """The donor (hidden 16) is the model (hidden 8) lifted by an isometry and moved: each shared
    token's donor row is its model row mapped, and each new token's donor row is a fresh vector
    mapped; both methods must give the new tokens those fresh vectors as rows."""
    model = _model(tmp_path / "model", MODEL_TOKENS, "</s>", 8, 0)
    original = load_dir(model)
    lift = _isometry(16, 8, 5).T
    fresh = {name: torch.randn(len(DONOR_TOKENS), 8, generator=torch.Generator().manual_seed(6)) for name in (EMBED, HEAD)}

    def edit(state):
        for name in (EMBED, HEAD):
            for i, token in enumerate(DONOR_TOKENS):
                source = original[name][MODEL_ROW[token]] if token in MODEL_ROW else fresh[name][i]
                state[name][i] = source @ lift + 0.25

    donor = _model(tmp_path / "donor", DONOR_TOKENS, "<|end|>", 16, 1, edit=edit)
    out = load_dir(tokensurgeon(model, donor, tmp_path / "out", method=method, k=4, batch_size=3, quiet=True).output_dir)
    for name in (EMBED, HEAD):
        for token in NEW:
            torch.testing.assert_close(_row(out[name], token), fresh[name][DONOR_TOKENS.index(token)], atol=1e-4, rtol=0)
        assert torch.equal(_row(out[name], "cd"), original[name][MODEL_ROW["cd"]])


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (what torch.quantile computes)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def test_magikarp_drops_the_tokens_made_badly_trained():
    """400 rows, 10 of them padding rows alike (unused, as is the reserved special token): the 4
    tokens with tiny input rows fall under the 1% norm quantile (only when there is an lm_head),
    the 2 whose input rows point exactly at the unused rows' mean and the 1 whose lm_head row
    does are the most similar to it (above the 99% quantile): all and only these are dropped."""
    generator = torch.Generator().manual_seed(13)
    embed, head = torch.randn(400, 16, generator=generator), torch.randn(400, 16, generator=generator)
    vocab = {f"t{i}": i for i in range(389)} | {"<|reserved_special_token_0|>": 389}
    direction = torch.randn(16, generator=generator)
    for matrix in (embed, head):
        matrix[389:] = direction + 0.3 * torch.randn(11, 16, generator=generator)
    tiny, alike, alike_out = ["t3", "t50", "t51", "t200"], ["t7", "t8"], ["t9"]
    for token in tiny:
        embed[vocab[token]] *= 1e-3
    for token in alike:
        embed[vocab[token]] = embed[389:].mean(dim=0) * 2
    head[vocab["t9"]] = head[389:].mean(dim=0) * 0.5
    good, bad = well_trained_tokens(vocab, embed, head)
    assert set(vocab) - good == set(tiny + alike + alike_out + ["<|reserved_special_token_0|>"])
    assert bad == 11 + 4 + 3  # the unused rows, then the norm and similarity drops
    norms = embed.norm(dim=1).tolist()
    assert sum(n < _quantile(norms, 0.01) for n in norms) == 4  # the quantile rule, written out
    good, _ = well_trained_tokens(vocab, embed, None)  # tied: no norm test, no lm_head test
    assert set(vocab) - good == set(alike + ["<|reserved_special_token_0|>"])
    good, bad = well_trained_tokens({f"t{i}": i for i in range(400)}, embed, None)  # no unused rows: no similarity test
    assert good == {f"t{i}" for i in range(400)} and bad == 0


def test_magikarp_end_to_end(tmp_path):
    """The model's "b" input row and "d" lm_head row are its padding rows' mean, and its "c"
    input row is tiny: they are no longer copied but approximated (mean here). The donor's "q"
    input row is tiny: under-trained in the donor and absent from the model, its rows are zero.
    The output bias follows the cut vocabulary."""
    def edit_model(state):
        state[EMBED][MODEL_TOKENS.index("b")] = state[EMBED][len(MODEL_TOKENS):].mean(dim=0)
        state[HEAD][MODEL_TOKENS.index("d")] = state[HEAD][len(MODEL_TOKENS):].mean(dim=0)
        state[EMBED][MODEL_TOKENS.index("c")] *= 1e-3
        state["lm_head.bias"] = torch.arange(len(MODEL_TOKENS) + 3, dtype=torch.float32) + 1

    def edit_donor(state):
        state[EMBED][DONOR_TOKENS.index("q")] *= 1e-3

    model = _model(tmp_path / "model", MODEL_TOKENS, "</s>", 8, 0, rows=len(MODEL_TOKENS) + 3, edit=edit_model)
    donor = _model(tmp_path / "donor", DONOR_TOKENS, "<|end|>", 16, 1, edit=edit_donor)
    report = tokensurgeon(model, donor, tmp_path / "out", method="mean", magikarp=True, quiet=True)
    out, original = load_dir(report.output_dir), load_dir(model)
    dropped = {"b", "c", "d"}
    for name in (EMBED, HEAD):
        assert report.rows[name] == {"exact": len(SHARED) - 3, "byte": 0, "prefix": 0, "approximated": len(NEW) - 1 + 3,
                                     "untrained": 1}
        for token in DONOR_TOKENS:
            row = _row(out[name], token)
            if token == "q":
                assert torch.equal(row, torch.zeros(8))
            elif token in MODEL_ROW and token not in dropped:
                assert torch.equal(row, original[name][MODEL_ROW[token]]), (name, token)
            else:
                assert torch.equal(row, original[name].mean(dim=0)), (name, token)
    expected = [float(MODEL_ROW[t] + 1) if t in MODEL_ROW and t not in dropped else 0.0 for t in DONOR_TOKENS]
    assert out["lm_head.bias"].tolist() == expected
    assert "--magikarp: 6 of the model's rows and 1 of the donor's" in str(report)


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


def test_moments_summed_by_chunks_match_the_whole_table_in_fp64():
    # 20000 rows span three 8192-row chunks; bf16 rows are converted chunk by chunk
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(20000, 5, generator=generator) + 4).bfloat16()
    y = torch.randn(20000, 3, generator=generator)
    x64, y64 = x.double(), y.double()
    torch.testing.assert_close(mean64(x), x64.mean(dim=0), rtol=1e-12, atol=0)
    x_mean, y_mean = mean64(x), mean64(y)
    expected = (x64 - x64.mean(dim=0)).T @ (y64 - y64.mean(dim=0))
    torch.testing.assert_close(cross_gram(x, x_mean, y, y_mean), expected, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(cross_gram(x, None, x, None), x64.T @ x64, rtol=1e-12, atol=0)
    assert cross_gram(x, x_mean, x, x_mean).dtype == torch.float64


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


def _rope(rows: torch.Tensor, heads: int, base: float, position: float) -> torch.Tensor:
    """RoPE at `position` written as complex multiplication: in each head, dimension d and
    d + head_dim / 2 are the real and imaginary parts of a number turned by position x
    base^(-2d / head_dim)."""
    split = rows.double().reshape(*rows.shape[:-1], heads, -1)
    half = split.shape[-1] // 2
    angle = position * base ** (-2 * torch.arange(half, dtype=torch.float64) / (2 * half))
    turned = torch.complex(split[..., :half], split[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([turned.real, turned.imag], dim=-1).reshape(rows.shape)


@pytest.mark.parametrize("k", [1, 3])
def test_mp_rope_recovers_a_scaled_rotated_shared_token(k):
    """A target that is -1.5 x a shared token's donor row at position 0.7 (donor: 2 heads, base
    1e4): the pursuit finds that token and position (through the negated residual), the fit gives
    it -1.5 and any further pick ~0, and the new row is -1.5 x the token's model row at position
    0.7 under the model's layout (4 heads, base 500)."""
    generator = torch.Generator().manual_seed(11)
    atoms, model_atoms = torch.randn(9, 16, generator=generator), torch.randn(9, 8, generator=generator)
    donor, model = Rotary(2, 10000.0), Rotary(4, 500.0)
    target = (-1.5 * _rope(atoms[4], 2, 10000.0, 0.7)).float().unsqueeze(0)
    torch.testing.assert_close(donor.position(atoms[4:5], -target), torch.tensor([0.7]), atol=1e-5, rtol=0)
    new = matching_pursuit_rope(target, atoms, model_atoms, k, donor, model)
    torch.testing.assert_close(new[0].double(), -1.5 * _rope(model_atoms[4], 4, 500.0, 0.7), atol=2e-5, rtol=0)


def _edit_config(directory: Path, **changes) -> None:
    """Set (value) or remove (None) keys of directory/config.json."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    path.write_text(json.dumps(config))


def test_mp_rope_end_to_end_reads_both_configs(tmp_path):
    """A new donor token whose donor rows are -2 x row(b) at position 0.5 (donor config: 4 heads,
    rope_theta 1e6) gets -2 x the model's row of b at position 0.5 under the model's config
    (2 heads, rope_theta 500, given in rope_parameters as transformers 5 writes it)."""
    def edit(state):
        for name in (EMBED, HEAD):
            table = state[name]
            table[DONOR_TOKENS.index("q")] = -2 * _rope(table[DONOR_TOKENS.index("b")], 4, 1e6, 0.5).float()

    model = _model(tmp_path / "model", MODEL_TOKENS, "</s>", 8, 0)
    donor = _model(tmp_path / "donor", DONOR_TOKENS, "<|end|>", 16, 1, edit=edit)
    _edit_config(model, rope_theta=None, rope_parameters={"rope_theta": 500.0, "rope_type": "default"})
    _edit_config(donor, num_attention_heads=4, rope_theta=1e6)
    out = load_dir(tokensurgeon(model, donor, tmp_path / "out", method="mp_rope", k=3, batch_size=2, quiet=True).output_dir)
    original = load_dir(model)
    for name in (EMBED, HEAD):
        expected = -2 * _rope(original[name][MODEL_ROW["b"]], 2, 500.0, 0.5)
        torch.testing.assert_close(_row(out[name], "q").double(), expected, atol=2e-5, rtol=0)
        assert torch.isfinite(out[name]).all()


@pytest.mark.parametrize("which, changes, pattern", [
    ("model", dict(rope_theta=None), r"model/config.json: mp_rope needs rope_theta \(top level or in rope_parameters\)"),
    ("donor", dict(rope_theta="big"), r"donor/config.json: mp_rope needs rope_theta.*got 'big'"),
    ("model", dict(num_attention_heads=None), r"model/config.json: mp_rope needs a positive integer num_attention_heads"),
    ("donor", dict(num_attention_heads=16), r"donor/config.json: model.embed_tokens.weight has 16 columns, which "
                                            r"num_attention_heads 16 does not split into heads of an even size"),
    ("model", dict(num_attention_heads=8), r"model/config.json: model.embed_tokens.weight has 8 columns"),  # head_dim 1
])
def test_mp_rope_config_errors_name_the_file_and_key(pair, tmp_path, which, changes, pattern):
    model, donor = pair
    _edit_config(model if which == "model" else donor, **changes)
    with pytest.raises(ConfigError, match=pattern):
        tokensurgeon(model, donor, tmp_path / "out", method="mp_rope", k=2, quiet=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    if "rope_theta" in changes:  # only mp_rope reads it (transformers checks the heads when it loads the tokenizer)
        tokensurgeon(model, donor, tmp_path / "omp", k=2, quiet=True)


def test_rotary_layout_checks_divisibility_and_a_missing_config(tmp_path):
    """Heads that do not divide the width (transformers refuses such a Llama config before
    tokensurgeon reads it, not every architecture's) and no config.json at all."""
    with pytest.raises(ConfigError, match=r"x/config.json: lm_head.weight has 16 columns, which num_attention_heads 3"):
        Rotary.of({"num_attention_heads": 3, "rope_theta": 1e4}, tmp_path / "x", {"lm_head.weight": 16})
    bare = write_checkpoint(tmp_path / "x", {"model.embed_tokens.weight": torch.zeros(4, 16)})  # no config.json
    with Checkpoint(bare) as checkpoint, \
            pytest.raises(CheckpointError, match=r"x: no config.json; mp_rope reads num_attention_heads and rope_theta"):
        _rotary(checkpoint, checkpoint, _Tensors.of(checkpoint, checkpoint))
    assert Rotary.of({"num_attention_heads": 4, "rope_theta": 500}, tmp_path, {"e": 16}) == Rotary(4, 500.0)


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
    (dict(method="mp_rope", k=13), ConfigError, r"--k 13: the two tokenizers share only 12 tokens"),
    (dict(method="stb", k=13), ConfigError, r"--k 13: the two tokenizers share only 12 tokens"),
    (dict(method="stb", k=9), ConfigError, r"--k 9: stb fits each basis vector with k shared tokens in 8 dimensions .*"
                                           r"model.embed_tokens.weight.*give --k 8 or less"),
    (dict(method="common_interpolation", weight_scheme="cubic"), ConfigError, r"--weight-scheme 'cubic'"),
    (dict(prefix_match="maybe"), ConfigError, r"--prefix-match 'maybe'"),
    (dict(new_vocab_scale=float("nan")), ConfigError, r"--new-vocab-scale must be a finite number, got nan"),
    (dict(new_vocab_noise=float("inf")), ConfigError, r"--new-vocab-noise must be a finite number, got inf"),
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
    assert main(["tokensurgeon", str(model), str(donor), str(tmp_path / "out"), "-a", "nearest"]) == 2
    assert "unknown approximation method 'nearest'; fastmerge implements omp" in capsys.readouterr().err
    assert mergekit_tokensurgeon_main([str(model), str(donor), str(tmp_path / "out"), "-a", "common_interpolation", "-k", "3",
                                       "-c", "-pm", "yes", "--random-seed", "4", "--no-write-model-card", "--device", "cpu",
                                       "--magikarp", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "gave the model the donor's tokenizer (20 tokens" in printed
    assert "--magikarp: 4 of the model's rows and 1 of the donor's judged under-trained" in printed
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
    (["-a", "mean", "--magikarp"], None, True),
    (["-a", "common_interpolation", "-k", "4", "-c", "-pm", "yes", "--magikarp"], None, True),
]


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-tokensurgeon not installed (set FASTMERGE_MERGEKIT_YAML)")
@pytest.mark.parametrize("ours, theirs, exact", PARITY, ids=[" ".join(p[0]) for p in PARITY])
def test_parity_with_mergekit(pair, tmp_path, ours, theirs, exact):
    """Copies, mean, zero, subword and distance-weighted interpolation, with or without --magikarp
    (the same tokens judged under-trained: the model's padding rows, its row most like them and
    its smallest-norm row, the donor's smallest-norm row): mergekit's bytes. omp and
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


# mergekit 0.1.5's stb passes its options object as k (TypeError); this runs it with k passed.
_MERGEKIT_STB_FIXED = ("import sys; import mergekit.scripts.tokensurgeon as t; basis = t.compute_token_basis; "
                       "t.compute_token_basis = lambda *a: basis(*a[:5], a[5].k); sys.argv[0] = 'mergekit-tokensurgeon'; t.main()")


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-tokensurgeon not installed (set FASTMERGE_MERGEKIT_YAML)")
def test_parity_with_mergekit_landmark_pca_and_stb(pair, tmp_path):
    """mergekit's landmark_pca applies the transpose of the Procrustes rotation and draws its
    components at random, and its stb cannot run and otherwise centers differently (affine.py),
    so on unrelated spaces the methods part ways by design. They agree where both are exact: a
    donor whose every row is a model-space vector lifted into 16 dimensions by an isometry, the
    shared tokens' vectors their model rows and the vectors' mean the mean of all model rows
    (which mergekit's stb adds back). Both then give each new token its vector back; each value
    is within 2e-5 of the tensor's largest |value| (fp32 eigen/OMP/least-squares rounding)."""
    model, _ = pair
    original = load_dir(model)
    lift = _isometry(16, 8, 8).T
    vectors = {}
    for name in (EMBED, HEAD):
        table = torch.randn(len(DONOR_TOKENS), 8, generator=torch.Generator().manual_seed(9))
        for token, row in MODEL_ROW.items():
            table[DONOR_TOKENS.index(token)] = original[name][row]
        balance = DONOR_TOKENS.index("r")
        table[balance] = 0
        table[balance] = original[name].mean(dim=0) * len(DONOR_TOKENS) - table.sum(dim=0)
        vectors[name] = table

    def edit(state):
        for name in (EMBED, HEAD):
            state[name] = vectors[name] @ lift

    donor = _model(tmp_path / "related", DONOR_TOKENS, "<|end|>", 16, 1, edit=edit)
    common = [str(model), str(donor)]
    failed = subprocess.run([MERGEKIT, *common, str(tmp_path / "stb-as-is"), "--device", "cpu", "-a", "stb", "-k", "4"],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "TypeError" in failed.stderr
    for method, command in (("landmark_pca", [MERGEKIT]), ("stb", [str(Path(MERGEKIT).with_name("python")), "-c", _MERGEKIT_STB_FIXED])):
        flags = ["--device", "cpu", "-a", method, "-k", "4"]
        assert main(["tokensurgeon", *common, str(tmp_path / f"ours-{method}"), "--quiet", *flags]) == 0
        subprocess.run([*command, *common, str(tmp_path / f"mk-{method}"), "--no-write-model-card", *flags], check=True,
                       capture_output=True)
        mine, reference = load_dir(tmp_path / f"ours-{method}"), load_dir(tmp_path / f"mk-{method}")
        for name in (EMBED, HEAD):
            scale = reference[name].abs().max().item()
            for token in NEW:  # both send each new token back to its vector
                torch.testing.assert_close(_row(mine[name], token), vectors[name][DONOR_TOKENS.index(token)],
                                           atol=2e-5 * scale, rtol=0)
            assert (mine[name] - reference[name]).abs().max().item() <= 2e-5 * scale, (method, name)


# mergekit 0.1.5's mp_rope reads `config.rope_theta`, an attribute transformers 5 no longer has
# (it keeps rope_parameters), so it stops with an AttributeError; this runs it with the
# attribute set from rope_parameters while the rows are approximated (the output config untouched).
_MERGEKIT_MP_ROPE_FIXED = (
    "import sys; import mergekit.common as c; import mergekit.scripts.tokensurgeon as t; load = c.ModelReference.config\n"
    "def config(self, *a, **k):\n"
    "    cfg = load(self, *a, **k)\n"
    "    if not hasattr(cfg, 'rope_theta'): cfg.rope_theta = cfg.rope_parameters['rope_theta']\n"
    "    return cfg\n"
    "compute = t.compute_new_embeddings\n"
    "def patched(*a, **k):\n"
    "    c.ModelReference.config = config\n"
    "    try: return compute(*a, **k)\n"
    "    finally: c.ModelReference.config = load\n"
    "t.compute_new_embeddings = patched; sys.argv[0] = 'mergekit-tokensurgeon'; t.main()")


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-tokensurgeon not installed (set FASTMERGE_MERGEKIT_YAML)")
@pytest.mark.parametrize("k, other_layouts", [(4, False), (12, True)])
def test_parity_with_mergekit_mp_rope(pair, tmp_path, k, other_layouts):
    """mp_rope on the pair as it is (both rope_theta 1e4, 2 heads) and with other layouts (model
    rope_theta 500, donor 4 heads and rope_theta 1e6): the same picks and positions, but the
    position fit sums the pairs' angles in another order and the final least squares over up to
    12 rotated rows in 16 dimensions amplifies those ulp, so each value is within 5e-6 of the
    tensor's largest |value| (observed: under 1e-6); every other tensor is mergekit's bytes."""
    model, donor = pair
    if other_layouts:
        _edit_config(model, rope_theta=500.0)
        _edit_config(donor, num_attention_heads=4, rope_theta=1e6)
    common = [str(model), str(donor)]
    flags = ["--device", "cpu", "-a", "mp_rope", "-k", str(k)]
    if not other_layouts:
        as_is = subprocess.run([MERGEKIT, *common, str(tmp_path / "mk-as-is"), *flags], capture_output=True, text=True)
        assert as_is.returncode == 0 or "rope_theta" in as_is.stderr
    assert main(["tokensurgeon", *common, str(tmp_path / "ours"), "--quiet", *flags]) == 0
    subprocess.run([str(Path(MERGEKIT).with_name("python")), "-c", _MERGEKIT_MP_ROPE_FIXED, *common, str(tmp_path / "mk"),
                    "--no-write-model-card", *flags], check=True, capture_output=True)
    mine, reference = load_dir(tmp_path / "ours"), load_dir(tmp_path / "mk")
    assert sorted(mine) == sorted(reference)
    for name, expected in reference.items():
        assert mine[name].dtype == expected.dtype and mine[name].shape == expected.shape, name
        if name not in (EMBED, HEAD):
            assert torch.equal(mine[name], expected), name
        else:
            assert (mine[name] - expected).abs().max().item() <= 5e-6 * expected.abs().max().item(), name
