"""The two run sizes: `full` (the published table, <= 30 min on 2 CPU cores) and `quick` (CI smoke
test, <= 3 min). Everything that sets model size, data size or training length lives here, so a
profile is the whole recipe apart from the seed."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .model import ModelShape
from .training import TrainSettings


@dataclass(frozen=True)
class Profile:
    name: str
    tasks: tuple[str, ...]
    shape: ModelShape
    pretrain: TrainSettings
    finetune: TrainSettings
    general_train_lines: int
    general_eval_lines: int
    n_train: int
    n_val: int
    n_test: int

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Profile(
    name="full",
    tasks=("reverse", "sort", "add", "shift", "count"),
    # 3.19M parameters: 0.45-0.55 s per pre-training step on 2 idle cores.
    shape=ModelShape(hidden=256, layers=4, heads=4, intermediate=688),
    # The base has to learn the task skills under their own tags (SKILL_TAGS). After these 1300
    # steps it answers 47.5% of reverse, 85.5% of sort, 82% of sum, 100% of shift and 99% of
    # count skill prompts (1800 steps at half the sort share: 95.5 / 72 / 96 / 100 / 97%).
    pretrain=TrainSettings(steps=1300, batch=32, lr=2e-3),
    # A short, gentle fine-tune with general-stream replay: it only has to route the task's tag
    # to a skill the base has, which keeps the task vectors small (see training.py). 150 steps:
    # at 100 sort reached 90.5% and reverse 91% (their skills are the weakest), at 150 96% and
    # 98.5%. Replay batch 8: the replay windows are two thirds of a step's tokens at 16, and 8
    # halves the step time with the same own-task accuracy (sort 96% both ways at 120-150 steps).
    finetune=TrainSettings(steps=150, batch=32, lr=5e-4, replay_batch=8),
    general_train_lines=50000,
    general_eval_lines=300,
    n_train=4000,
    n_val=100,
    n_test=200,
)

QUICK = Profile(
    name="quick",
    tasks=("reverse", "shift", "count"),
    shape=ModelShape(hidden=64, layers=2, heads=2, intermediate=192),
    pretrain=TrainSettings(steps=100, batch=32, lr=3e-3),
    finetune=TrainSettings(steps=100, batch=32, lr=3e-3, replay_batch=8),
    general_train_lines=3000,
    general_eval_lines=60,
    n_train=1000,
    n_val=30,
    n_test=50,
)

PROFILES = {p.name: p for p in (FULL, QUICK)}
