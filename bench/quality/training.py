"""Pre-training on the general stream and full fine-tuning on one task, deterministic by seed.

Both loops are plain AdamW with linear warm-up and cosine decay. Pre-training predicts every
character of random windows of the general stream; fine-tuning predicts only answer characters
(prompt and padding are masked out of the loss), the usual supervised fine-tuning objective,
plus, when `replay_batch` > 0, the pre-training loss on windows of the general stream. That
replay keeps each fine-tune close to the base (small task vectors, general skill retained),
the regime in which merging task vectors is meaningful; without it the fine-tunes drifted so
far that general next-char accuracy fell from 53% to 3-9% and no merge kept more than one task.
All randomness comes from one `torch.Generator` per run, so a recipe and its seed give the same
weights on every rerun (for a fixed thread count).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .tasks import Example
from .tokenizer import PAD_ID, encode

IGNORE = -100


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch: int
    lr: float
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    # Pre-training window length in characters (fine-tuning batches use the longest example).
    window: int = 64
    # Fine-tuning only: general-stream windows per step whose language-model loss is added to
    # the task loss (0 = no replay).
    replay_batch: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _schedule(step: int, settings: TrainSettings) -> float:
    warmup = max(1, int(settings.steps * settings.warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimise(model, settings: TrainSettings, next_batch) -> list[float]:
    """Run `settings.steps` AdamW steps; returns the loss curve.

    `next_batch()` gives a list of (input_ids, labels) batches whose mean losses are summed into
    one step (the task batch and, with replay, a general-stream batch).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    losses = []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * _schedule(step, settings)
        loss = sum(
            model(input_ids=input_ids, attention_mask=(input_ids != PAD_ID).long(), labels=labels).loss
            for input_ids, labels in next_batch()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _window_sampler(text: str, window: int, batch: int, generator: torch.Generator):
    """A function giving (ids, labels) of `batch` random `window`-character slices of `text`."""
    stream = torch.tensor(encode(text), dtype=torch.long)

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(stream) - window, (batch,), generator=generator)
        windows = torch.stack([stream[s : s + window] for s in starts.tolist()])
        return windows, windows.clone()

    return sample


def pretrain(model, text: str, settings: TrainSettings, seed: int) -> list[float]:
    """Language-model `model` on random windows of `text`."""
    sample = _window_sampler(text, settings.window, settings.batch, torch.Generator().manual_seed(seed))
    return _optimise(model, settings, lambda: [sample()])


def answer_batch(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of full example lines and labels that keep only answer characters."""
    width = max(len(e.text) for e in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        line = encode(example.text)
        ids[row, : len(line)] = torch.tensor(line)
        start = len(example.prompt)
        labels[row, start : len(line)] = ids[row, start : len(line)]
    return ids, labels


def finetune(model, examples: list[Example], settings: TrainSettings, seed: int,
             replay_text: str = "") -> list[float]:
    """Supervised fine-tuning of all of `model`'s weights on `examples`, in shuffled epochs,
    with `settings.replay_batch` windows of `replay_text` (the pre-training stream) per step."""
    if settings.replay_batch and not replay_text:
        raise ValueError(f"replay_batch={settings.replay_batch} needs the general stream as replay_text")
    generator = torch.Generator().manual_seed(seed)
    replay = _window_sampler(replay_text, settings.window, settings.replay_batch, generator) \
        if settings.replay_batch else None
    order: list[int] = []

    def next_batch():
        while len(order) < settings.batch:
            order.extend(torch.randperm(len(examples), generator=generator).tolist())
        picked = [examples[i] for i in order[: settings.batch]]
        del order[: settings.batch]
        return [answer_batch(picked)] + ([replay()] if replay else [])

    return _optimise(model, settings, next_batch)
