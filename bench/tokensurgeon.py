"""Tokenizer surgery benchmark: `fastmerge tokensurgeon` against mergekit-tokensurgeon, in one run.

On a generated checkpoint set (bench.checkpoints) the base model gets tokenizer A and the first
fine-tune (the donor) tokenizer B, two byte-level BPE tokenizers trained here in a second or two
on seeded synthetic text (no hub access needed): A on words of one made-up language, B on the same
text plus some of a second language, so B shares most of A's tokens and a realistic share of its
tokens (about a quarter at vocab 32000) is new to the model and must be approximated (omp by
default). Both are saved as transformers PreTrainedTokenizerFast with <unk>, <s>, </s>, <pad> at
ids 0-3, each vocabulary the size of the model's. The generated set is left as it is: the two
models are directories under WORK/tokensurgeon-PRESET/ whose weight files link to the set's.

`fastmerge tokensurgeon BASE DONOR OUT` runs `--repeat` times, each in a fresh process (median
wall, highest peak RSS from GNU time, as in bench.e2e), mergekit-tokensurgeon once on the same
arguments (CPU, offline), after an untimed read of the inputs warms the page cache. The two outputs
are then compared tensor by tensor: names, shapes and dtypes, bytes for every tensor; for the
token-indexed ones (embedding, lm_head) also the largest absolute difference and how many rows
differ (omp's rows may differ by a few fp32 ulp by design; everything else must be the same bytes).
Prints one line per engine, the ratios and the parity, and writes WORK/tokensurgeon-PRESET-METHOD.json.

Run: `python -m bench.tokensurgeon --preset 1b --work /tmp/fm-bench --repeat 3` (`--no-mergekit` to
skip it; `-a common_interpolation`, `-k 32` for the other settings).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from bench.checkpoints import generate, model_files, spec_from_args
from bench.e2e import (MERGEKIT_YAML, MergeRun, compare_outputs, comparison_parser, median_run, output_bytes, read_files,
                       run_child)

MERGEKIT_TOKENSURGEON = MERGEKIT_YAML.with_name("mergekit-tokensurgeon")
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# Syllables of the made-up languages: consonant + vowel, and some with a closing n.
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + [c + v + "n" for c in "bcdfghjk" for v in "aeiou"]
LEXICON_WORDS = 40_000
CORPUS_WORDS = 400_000  # the most words of A's text: enough for 32000 tokens, trained in about a second
SECOND_LANGUAGE_SHARE = 0.3  # B's text: A's text plus this much again of the second language
# 256 byte-level symbols and the four special tokens: the smallest vocabulary a tokenizer here has.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def lexicon(seed: int, size: int = LEXICON_WORDS) -> list[str]:
    """`size` made-up words of one to four syllables (a language), the same for a seed."""
    rng = random.Random(seed)
    return ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(size)]


def text(words: list[str], seed: int, count: int) -> list[str]:
    """`count` words drawn Zipf-like (the r-th word with weight 1 / (r + 10)), 1000 to a line."""
    rng = random.Random(seed)
    drawn = rng.choices(words, weights=[1.0 / (rank + 10) for rank in range(len(words))], k=count)
    return [" ".join(drawn[i:i + 1000]) for i in range(0, len(drawn), 1000)]


def train_tokenizer(lines: list[str], vocab_size: int):
    """A byte-level BPE tokenizer of `vocab_size` tokens (special tokens first) as a
    PreTrainedTokenizerFast."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def tokenizer_pair(vocab_size: int, seed: int = 0) -> tuple:
    """(A, B): A trained on the first language, B on the same text plus some of a second one."""
    if vocab_size < MIN_VOCAB:
        raise SystemExit(f"the model's vocabulary ({vocab_size}) is too small for a byte-level tokenizer "
                         f"(at least {MIN_VOCAB})")
    words = min(CORPUS_WORDS, max(20_000, 16 * vocab_size))  # small vocabularies train on less text
    first = text(lexicon(seed), seed + 10, words)
    second = text(lexicon(seed + 1), seed + 11, int(words * SECOND_LANGUAGE_SHARE))
    return train_tokenizer(first, vocab_size), train_tokenizer(first + second, vocab_size)


def model_with_tokenizer(source: Path, directory: Path, tokenizer) -> Path:
    """`directory`: the model at `source` (its weight files linked, its config copied) with `tokenizer`."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for path in source.iterdir():
        if path.name.endswith(".safetensors") or path.name.endswith(".safetensors.index.json"):
            (directory / path.name).symlink_to(path.resolve())
    shutil.copy(source / "config.json", directory / "config.json")
    tokenizer.save_pretrained(str(directory))
    return directory


def approximation_counts(log: str) -> dict[str, dict[str, int]]:
    """fastmerge's summary lines `NAME: 5 exact, 0 byte, 0 prefix, 3 approximated` as a dict."""
    counts = {}
    for name, tallies in re.findall(r"^(\S+): (\d+ exact, .*approximated)$", log, re.MULTILINE):
        counts[name] = {rule: int(n) for n, rule in (part.split(" ") for part in tallies.split(", "))}
    return counts


def parity_summary(parity: dict) -> str:
    tensors = parity["tensors"]
    same = sum(entry["same_bytes"] for entry in tensors.values())
    words = [f"{same}/{len(tensors)} tensors byte-identical"]
    if parity["only_fastmerge"] or parity["only_mergekit"]:
        words.append(f"names differ: only fastmerge {parity['only_fastmerge']}, only mergekit {parity['only_mergekit']}")
    for name, entry in tensors.items():
        if not entry["same_bytes"]:
            if "max_abs_diff" in entry:
                words.append(f"{name}: max abs diff {entry['max_abs_diff']:.3g} in {entry['rows_differing']} rows")
            else:
                words.append(f"{name}: DIFFERS (shape {entry['shape']}, dtype {entry['dtype']})")
    return "; ".join(words)


def main(argv: list[str] | None = None) -> None:
    parser = comparison_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=1, help="fastmerge runs to take the median of [1]")
    parser.add_argument("-a", "--method", default="omp", help="approximation method (both tools' -a) [omp]")
    parser.add_argument("-k", "--k", type=int, default=64, help="shared tokens per approximated token [64]")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    label = "custom" if args.custom else args.preset
    spec = spec_from_args(args)
    models = generate(args.work / label, spec)
    first, second = tokenizer_pair(spec.shape.vocab_size, spec.seed)
    where = args.work / f"tokensurgeon-{label}"
    base = model_with_tokenizer(models.base, where / "base", first)
    donor = model_with_tokenizer(models.fine_tunes[0], where / "donor", second)
    shared = len(set(first.get_vocab()) & set(second.get_vocab()))
    print(f"tokenizers: model {len(first)}, donor {len(second)} tokens, {shared} shared "
          f"({len(second) - shared} donor tokens new to the model)")
    read_files(model_files([base, donor]))  # warm the page cache, untimed
    ours, theirs = args.work / f"tokensurgeon-{label}-fastmerge", args.work / f"tokensurgeon-{label}-mergekit"
    settings = ["-a", args.method, "-k", str(args.k)]
    command = [sys.executable, "-m", "fastmerge", "tokensurgeon", str(base), str(donor), str(ours), "--quiet", "--overwrite",
               "--device", "cpu", *settings]
    runs = [run_child("fastmerge", args.method, command) for _ in range(args.repeat)]
    summary = median_run(runs)
    if summary.returncode:
        sys.exit(f"fastmerge tokensurgeon failed:\n{summary.log_tail}")
    wall, rss = summary.wall_s, summary.peak_rss_bytes
    counts = approximation_counts(runs[-1].log_tail)
    rows = ", ".join(f"{name} {c['exact']} exact / {c['approximated']} approximated" for name, c in counts.items())
    print(f"fastmerge tokensurgeon -a {args.method} -k {args.k}: {wall:.1f} s "
          f"({', '.join(f'{r.wall_s:.1f}' for r in runs)}), peak RSS {rss / 1e9:.2f} GB, "
          f"{output_bytes(ours) / 1e9:.2f} GB written; {rows}")
    report = {"preset": label, "spec": spec.to_json(), "method": args.method, "k": args.k, "repeat": args.repeat,
              "tokenizers": {"model": len(first), "donor": len(second), "shared": shared}, "rows": counts,
              "fastmerge": {"wall_s": wall, "peak_rss_bytes": rss, "runs": [asdict(r) for r in runs]}}
    if args.mergekit and MERGEKIT_TOKENSURGEON.exists():
        shutil.rmtree(theirs, ignore_errors=True)
        mk: MergeRun = run_child("mergekit", args.method, [
            "env", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", str(MERGEKIT_TOKENSURGEON), str(base), str(donor),
            str(theirs), "--device", "cpu", "--no-write-model-card", "--quiet", *settings])
        report["mergekit"] = asdict(mk)
        if mk.returncode:
            print(f"mergekit-tokensurgeon failed:\n{mk.log_tail}")
        else:
            print(f"mergekit-tokensurgeon: {mk.wall_s:.1f} s, peak RSS {mk.peak_rss_bytes / 1e9:.2f} GB")
            print(f"fastmerge {mk.wall_s / wall:.1f}x faster, {mk.peak_rss_bytes / rss:.1f}x less memory")
            report["parity"] = compare_outputs(ours, theirs)
            print(f"parity: {parity_summary(report['parity'])}")
    path = args.work / f"tokensurgeon-{label}-{args.method}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    if report.get("mergekit", {}).get("returncode"):
        sys.exit(1)


if __name__ == "__main__":
    main()
