"""Scoring a checkpoint: exact-match task accuracy by greedy decoding, and general retention.

Greedy decoding is batched (left padding, KV cache via `generate`) and bounded by the task's
longest possible answer plus the end-of-answer newline, so a whole test split costs a handful
of forward passes. Retention is next-character accuracy on held-out general text: the
pre-trained skill every fine-tune and merge should keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scoring import exact_match_accuracy
from .tasks import ANSWER_END, Example, Task
from .tokenizer import EOS_ID, PAD_ID, decode, encode


def load_model(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def greedy_answers(model, prompts: list[str], max_new_tokens: int, batch: int = 256) -> list[str]:
    """The model's greedy continuation of each prompt, cut at the first newline."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch):
        chunk = [encode(p) for p in prompts[start : start + batch]]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        for row, line in enumerate(chunk):
            ids[row, width - len(line) :] = torch.tensor(line)
        out = model.generate(
            input_ids=ids, attention_mask=(ids != PAD_ID).long(), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        )
        for row in out[:, width:].tolist():
            answers.append(decode(row).split(ANSWER_END, 1)[0])
    return answers


def task_accuracy(model, task: Task, examples: list[Example]) -> float:
    """Exact-match accuracy (0..1) of greedy answers on `examples` of `task`."""
    predictions = greedy_answers(model, [e.prompt for e in examples], task.max_answer_len + 1)
    return exact_match_accuracy(predictions, [e.answer for e in examples])


@dataclass(frozen=True)
class Retention:
    next_char_accuracy: float
    loss: float


@torch.no_grad()
def general_retention(model, text: str, window: int) -> Retention:
    """Next-character accuracy and mean loss over consecutive `window`-character chunks of text."""
    stream = torch.tensor(encode(text), dtype=torch.long)
    usable = len(stream) // window * window
    chunks = stream[:usable].view(-1, window)
    logits = model(input_ids=chunks).logits[:, :-1]
    targets = chunks[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return Retention(next_char_accuracy=accuracy.item(), loss=loss.item())
