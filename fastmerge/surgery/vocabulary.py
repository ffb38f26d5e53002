"""Tokens compared across two tokenizers the way mergekit-tokensurgeon 0.1.5 compares them.

Two tokenizers spell the same piece of text differently: a SentencePiece vocabulary marks a
word start with "▁", a byte-level BPE one with "Ġ", and each names its special tokens as it
likes ("<s>" or "<|begin_of_text|>"). So before the vocabularies are matched every token is
normalized: a token that starts with its tokenizer's word-start marker becomes
(WORD_START, rest); a token that is one of the tokenizer's named special tokens becomes
(SPECIAL, its role, e.g. "eos_token"); anything else stays the string it is. Which marker a
tokenizer uses is read from its class, as mergekit does (GPT-2 and Qwen2 style: "Ġ";
Llama, T5 and Gemma style: "▁", unless the vocabulary holds "Ġhello", as DeepSeek's does;
any other class: "Ġ").

Where two tokens of one tokenizer normalize to the same key, the lowest id keeps it
(mergekit keeps whichever its dictionary yields last, which is not a stable order).
"""

from __future__ import annotations

from typing import Any, Iterator, Union

WORD_START = "word_start"
SPECIAL = "special"

# A normalized token: the plain string, or (WORD_START | SPECIAL, text).
Token = Union[str, tuple[str, str]]

_GPT2_STYLE = ("GPT2Tokenizer", "GPT2TokenizerFast", "OpenAIGPTTokenizer", "OpenAIGPTTokenizerFast",
               "Qwen2Tokenizer", "Qwen2TokenizerFast")
_SENTENCEPIECE_STYLE = ("LlamaTokenizer", "LlamaTokenizerFast", "T5Tokenizer", "T5TokenizerFast",
                        "GemmaTokenizer", "GemmaTokenizerFast")


def _classes(transformers: Any, names: tuple[str, ...]) -> tuple[type, ...]:
    return tuple(cls for cls in (getattr(transformers, name, None) for name in names) if isinstance(cls, type))


def word_start_marker(tokenizer: Any, vocab: dict[str, int]) -> str:
    """The prefix that marks a word start in this tokenizer's tokens (see the module doc)."""
    import transformers

    if isinstance(tokenizer, _classes(transformers, _GPT2_STYLE)):
        return "Ġ"
    if isinstance(tokenizer, _classes(transformers, _SENTENCEPIECE_STYLE)):
        return "Ġ" if "Ġhello" in vocab else "▁"
    return "Ġ"


def normalize(token: str, specials: dict[str, Any], marker: str) -> Token:
    """One token's key: the word-start test comes first, then the special-token roles in the
    order the tokenizer lists them."""
    if token.startswith(marker):
        return (WORD_START, token[len(marker):])
    for role, values in specials.items():
        if token == values or (isinstance(values, (list, tuple)) and token in values):
            return (SPECIAL, role)
    return token


def normalized_vocabulary(tokenizer: Any) -> dict[Token, int]:
    """Normalized token -> id for every token the tokenizer has (added tokens too), built in id
    order so the lowest id wins a shared key."""
    vocab = tokenizer.get_vocab()
    marker = word_start_marker(tokenizer, vocab)
    specials = dict(tokenizer.special_tokens_map)
    normalized: dict[Token, int] = {}
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        normalized.setdefault(normalize(token, specials, marker), index)
    return normalized


def text_of(token: Token) -> str:
    """The text a normalized token stands for, to tokenize it with another tokenizer: a word
    start becomes a leading space; a special token becomes its role's name (mergekit's choice)."""
    if isinstance(token, tuple):
        return (" " + token[1]) if token[0] == WORD_START else token[1]
    return token


def prefixes(token: Token) -> Iterator[Token]:
    """The token's proper prefixes, longest first, with its marker kept; none for special tokens,
    and none that is only whitespace (the walk stops at the first such prefix)."""
    marker, text = token if isinstance(token, tuple) else (None, token)
    if marker == SPECIAL:
        return
    for end in range(len(text) - 1, 0, -1):
        prefix = text[:end]
        if not prefix.strip():
            return
        yield prefix if marker is None else (marker, prefix)


def byte_counterpart(token: Token) -> str | None:
    """The other spelling of a single byte: a one-character token below U+0100 <-> its "<0xAB>"
    byte-fallback token. None for any other token."""
    if not isinstance(token, str):
        return None
    if len(token) == 1 and ord(token) < 256:
        return f"<0x{ord(token):02X}>"
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return chr(int(token[3:-1], 16))
        except ValueError:
            return None
    return None
