"""Fast unit tests of the merge-quality benchmark's tasks, tokenizer, scoring and cache."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from bench.quality.cache import cached_checkpoint, recipe_key
from bench.quality.scoring import continual_summary, exact_match_accuracy
from bench.quality.tasks import ALPHABET, RESERVED_TAGS, SKILL_TAGS, TASKS, general_text, make_splits
from bench.quality.tokenizer import decode, encode, save_hf_tokenizer


def _check_answer(task: str, raw: str, answer: str) -> bool:
    """Independent checks: properties of the answer, not a re-implementation of the solver."""
    if task == "reverse":
        return len(answer) == len(raw) and all(answer[i] == raw[-1 - i] for i in range(len(raw)))
    if task == "sort":
        return Counter(answer) == Counter(raw) and all(a <= b for a, b in zip(answer, answer[1:]))
    if task == "add":
        # Every number least significant digit first, written with three digits, the sum four.
        left, right = (side[::-1] for side in raw.split("+"))
        return all(len(side) == 3 and side.isdigit() for side in (left, right)) and len(answer) == 4 \
            and answer.isdigit() and int(answer[::-1]) - int(left) == int(right)
    if task == "shift":
        return len(answer) == len(raw) and all(ord(a) - ord(r) == 3 for a, r in zip(answer, raw))
    if task == "count":
        return int(answer) == len([c for c in raw if c == "a"])
    raise AssertionError(f"no check for task {task}")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_answers_pass_an_independent_check(name):
    task = TASKS[name]
    splits = make_splits(task, 300, 50, 50, seed=3)
    for example in splits.train + splits.val + splits.test:
        tag, rest = example.prompt.split(":", 1)
        assert tag == task.tag and rest.endswith("=")
        raw = rest[:-1]
        assert _check_answer(name, raw, example.answer), example
        if name == "add":  # the task adds 3-digit numbers (the stream's sums also 000-099)
            assert all(side[-1] != "0" for side in raw.split("+")), example
        assert 1 <= len(example.answer) <= task.max_answer_len


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_deterministic_disjoint_and_stable_in_size(name):
    task = TASKS[name]
    first = make_splits(task, 200, 40, 60, seed=0)
    assert first == make_splits(task, 200, 40, 60, seed=0)
    prompts = [{e.prompt for e in split} for split in (first.train, first.val, first.test)]
    assert sum(map(len, prompts)) == 300  # no duplicates inside or across splits
    assert make_splits(task, 200, 40, 60, seed=1).test != first.test
    # A bigger training set leaves the held-out prompts unchanged.
    bigger = make_splits(task, 500, 40, 60, seed=0)
    assert bigger.test == first.test and bigger.val == first.val


def test_tasks_disagree_on_the_same_input():
    """The letter tasks map one input to different answers: fine-tuning on one conflicts with another."""
    raw = "hello"
    answers = {name: TASKS[name].solve(raw) for name in ("reverse", "sort", "shift")}
    assert len(set(answers.values())) == 3


def test_general_stream_is_deterministic_and_never_shows_task_prompts():
    text = general_text(500, seed=0, split="train")
    assert text == general_text(500, seed=0, split="train")
    assert text != general_text(500, seed=0, split="eval")
    assert set(text) <= set(ALPHABET)
    tags = {t.tag + ":" for t in TASKS.values()}
    assert not any(line[:4] in tags for line in text.splitlines())
    # Every task's skill appears, under its own skill tag, with correct answers.
    for name, skill in SKILL_TAGS.items():
        lines = [line for line in text.splitlines() if line.startswith(skill + ":")]
        assert len(lines) > 20, name
        for line in lines:
            raw, answer = line[len(skill) + 1 :].split("=")
            assert _check_answer(name, raw, answer), line
    # The other operation lines copy their input, under tags that are neither skill nor task tags
    # and vary from line to line (so an unknown tag means "copy" to the base).
    copies = [line for line in text.splitlines() if "=" in line and line[:3] not in SKILL_TAGS.values()]
    assert len({line.split(":")[0] for line in copies}) > 20
    for line in copies:
        tag, rest = line.split(":", 1)
        raw, answer = rest.split("=")
        assert tag not in RESERVED_TAGS and raw == answer, line


def test_tokenizer_round_trip_and_hf_agreement(tmp_path):
    from transformers import AutoTokenizer

    text = "rev:abc=cba\nhello world\nadd:123+4567=4690\n"
    assert decode(encode(text)) == text
    with pytest.raises(ValueError, match="'#'"):
        encode("a#b")
    save_hf_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text, add_special_tokens=False)["input_ids"] == encode(text)
    assert hf.decode(encode(text)) == text


def test_exact_match_is_strict():
    assert exact_match_accuracy(["abc", "ab", "x"], ["abc", "abc", "x"]) == pytest.approx(2 / 3)
    assert exact_match_accuracy(["abc "], ["abc"]) == 0.0
    with pytest.raises(ValueError):
        exact_match_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        exact_match_accuracy([], [])


def test_continual_summary_average_and_forgetting():
    order = ["t1", "t2", "t3"]
    steps = [
        {"t1": 0.9, "t2": 0.0, "t3": 0.1},
        {"t1": 0.5, "t2": 0.8, "t3": 0.0},
        {"t1": 0.7, "t2": 0.2, "t3": 1.0},
    ]
    summary = continual_summary(steps, order)
    assert [s["average_accuracy"] for s in summary] == pytest.approx([0.9, 0.65, (0.7 + 0.2 + 1.0) / 3])
    # Step 2: t1 dropped 0.9 -> 0.5. Step 3: t1 best 0.9 now 0.7 (0.2), t2 best 0.8 now 0.2 (0.6).
    assert [s["forgetting"] for s in summary] == pytest.approx([0.0, 0.4, 0.4])
    assert [s["task"] for s in summary] == order
    with pytest.raises(ValueError):
        continual_summary(steps + steps, order)


def test_cache_builds_once_and_keys_on_the_recipe(tmp_path):
    calls = []

    def build(directory):
        calls.append(directory)
        (directory / "weights").write_text("w")

    first, built = cached_checkpoint(tmp_path, "m", {"a": 1}, build)
    again, built_again = cached_checkpoint(tmp_path, "m", {"a": 1}, build)
    assert (built, built_again) == (True, False) and first == again and len(calls) == 1
    assert json.loads((first / "recipe.json").read_text()) == {"a": 1}
    other, _ = cached_checkpoint(tmp_path, "m", {"a": 2}, build)
    assert other != first and recipe_key({"a": 1}) != recipe_key({"a": 2})


def test_cache_leaves_nothing_behind_when_the_build_fails(tmp_path):
    def broken(directory):
        (directory / "partial").write_text("x")
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError):
        cached_checkpoint(tmp_path, "m", {"a": 1}, broken)
    assert list(tmp_path.iterdir()) == []



def test_finetune_replay_needs_the_general_stream_and_changes_the_weights():
    import torch

    from bench.quality.model import ModelShape, new_model
    from bench.quality.training import TrainSettings, finetune

    shape = ModelShape(hidden=16, layers=1, heads=2, intermediate=32)
    examples = make_splits(TASKS["reverse"], 20, 1, 1, seed=0).train
    settings = TrainSettings(steps=2, batch=4, lr=1e-2, window=16, replay_batch=2)
    with pytest.raises(ValueError, match="replay_batch=2"):
        finetune(new_model(shape, 0), examples, settings, seed=0)
    text = general_text(50, seed=0, split="train")
    plain, replayed = new_model(shape, 0), new_model(shape, 0)
    finetune(plain, examples, TrainSettings(steps=2, batch=4, lr=1e-2, window=16), seed=0)
    finetune(replayed, examples, settings, seed=0, replay_text=text)
    assert not torch.equal(plain.lm_head.weight, replayed.lm_head.weight)
