"""Tiny random Llama checkpoints with a character tokenizer.

Model hubs are not always reachable (CI, air-gapped boxes), yet RECALL's capture needs a real
architecture and a real tokenizer. These build both locally in milliseconds; tests, demos and
benchmarks use them instead of downloading anything.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from .models import require_transformers

CHAR_ALPHABET = string.ascii_lowercase + string.digits + " .,;:!?'-"
_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


def save_char_tokenizer(directory: str | Path, alphabet: str = CHAR_ALPHABET) -> int:
    """Save a one-token-per-character tokenizer (BOS prepended) in `directory`; returns its vocab size."""
    transformers = require_transformers("the toy tokenizer")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + tuple(dict.fromkeys(alphabet.lower())))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(directory))
    return len(vocab)


def save_toy_llama(
    directory: str | Path,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    intermediate_size: int = 64,
    dtype: torch.dtype = torch.float32,
    alphabet: str = CHAR_ALPHABET,
) -> Path:
    """A random LlamaForCausalLM (safetensors) plus its char tokenizer in `directory`."""
    transformers = require_transformers("the toy model")
    directory = Path(directory)
    vocab_size = save_char_tokenizer(directory, alphabet)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory
