"""The tokenizer surgery benchmark on a small set: the two tokenizers, the surgery, the figures
line and the JSON report."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from bench import tokensurgeon  # noqa: E402
from fastmerge.io.checkpoint import Checkpoint  # noqa: E402


def test_the_donor_tokenizer_shares_most_but_not_all_tokens():
    first, second = tokensurgeon.tokenizer_pair(512)
    assert len(first) == len(second) == 512
    assert all(first.convert_tokens_to_ids(t) == second.convert_tokens_to_ids(t) == i
               for i, t in enumerate(tokensurgeon.SPECIAL_TOKENS.values()))
    shared = set(first.get_vocab()) & set(second.get_vocab())
    assert 0.5 * len(second) < len(shared) < len(second)


def test_the_benchmark_gives_the_model_the_donors_vocabulary(tmp_path, capsys):
    tokensurgeon.main(["--custom", "64,160,2,4,2,512", "--fine-tunes", "1", "-k", "8", "--work", str(tmp_path),
                       "--no-mergekit"])
    out = capsys.readouterr().out
    assert "fastmerge tokensurgeon -a omp -k 8" in out and "approximated" in out
    report = json.loads((tmp_path / "tokensurgeon-custom-omp.json").read_text())
    assert report["fastmerge"]["wall_s"] > 0 and report["fastmerge"]["peak_rss_bytes"] > 0
    assert "mergekit" not in report
    counts = report["rows"]["model.embed_tokens.weight"]
    new = report["tokenizers"]["donor"] - report["tokenizers"]["shared"]
    assert counts["approximated"] == new > 0 and counts["exact"] == report["tokenizers"]["shared"]
    with Checkpoint(tmp_path / "tokensurgeon-custom-fastmerge") as result:
        assert tuple(result.info("model.embed_tokens.weight").shape) == (report["tokenizers"]["donor"], 64)
        assert tuple(result.info("lm_head.weight").shape) == (report["tokenizers"]["donor"], 64)
        assert result.config["vocab_size"] == report["tokenizers"]["donor"]
    assert (tmp_path / "tokensurgeon-custom-fastmerge" / "tokenizer.json").is_file()
