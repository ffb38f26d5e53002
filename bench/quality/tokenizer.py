"""Character-level vocabulary, plus a real Hugging Face tokenizer saved beside each checkpoint.

Training and evaluation encode with the plain dict below (fast, no padding logic to get wrong);
the saved `PreTrainedTokenizerFast` maps the same characters to the same ids so the checkpoints
load with AutoTokenizer / AutoModelForCausalLM like any hub model. A unit test checks the two
agree.
"""

from __future__ import annotations

from pathlib import Path

from .tasks import ALPHABET, ANSWER_END

PAD = "<pad>"
UNK = "<unk>"
SPECIAL = (PAD, UNK)
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate([*SPECIAL, *ALPHABET])}
ID_TO_CHAR = {i: tok for tok, i in VOCAB.items()}
PAD_ID = VOCAB[PAD]
EOS_ID = VOCAB[ANSWER_END]
# Embedding rows: the vocabulary rounded up to a multiple of 8.
VOCAB_SIZE = (len(VOCAB) + 7) // 8 * 8


def encode(text: str) -> list[int]:
    try:
        return [VOCAB[c] for c in text]
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the benchmark vocabulary") from None


def decode(ids: list[int]) -> str:
    """Characters for `ids`, skipping padding."""
    return "".join(ID_TO_CHAR.get(i, "") for i in ids if i != PAD_ID)


def save_hf_tokenizer(directory: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json into `directory`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=UNK))
    # Every character, newline and space included, is its own token.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, eos_token=ANSWER_END,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(directory))
