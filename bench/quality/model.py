"""The benchmark's model: a tiny Llama-architecture causal LM over the character vocabulary.

Real `LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU, separate lm_head) so merges exercise the same
tensor names and shapes as a hub Llama checkpoint, just small enough to train on two CPU cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .tokenizer import EOS_ID, PAD_ID, VOCAB_SIZE


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 96

    def to_dict(self) -> dict:
        return asdict(self)


def llama_config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
    )


def new_model(shape: ModelShape, seed: int):
    """A freshly initialised model; the seed fixes the initial weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(shape)).float()
