"""Synthetic text tasks and the "general" text stream used by the merge-quality benchmark.

Every task is a string-to-string function written in one prompt format, ``tag:input=`` followed
by the answer and a newline, so one character-level model can hold all of them and a merge can
be scored by exact match. The five tasks read the same kind of input (short letter strings, or
digits for addition) but demand different outputs of the same length and alphabet, so a model
fine-tuned on one of them is pulled away from the others: that interference is what merge
methods have to resolve.

Splits are fixed: examples are drawn from one seeded stream, test first, then validation, then
train, with no input repeated across splits, so a split never depends on the size of another.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase
DIGITS = string.digits
ANSWER_END = "\n"
# Everything the tokenizer must cover: inputs, answers, prompt punctuation, general text.
ALPHABET = ANSWER_END + " " + DIGITS + LETTERS + ":=+"


@dataclass(frozen=True)
class Example:
    """One prompt and its exact expected answer (without the trailing newline)."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The full training line: prompt, answer, end-of-answer newline."""
        return self.prompt + self.answer + ANSWER_END


@dataclass(frozen=True)
class Task:
    """A named string function plus the sampler of its inputs."""

    name: str
    tag: str
    description: str
    sample_input: Callable[[random.Random], str]
    solve: Callable[[str], str]
    # Upper bound on answer length, so greedy decoding can stop after a fixed number of tokens.
    max_answer_len: int

    def example(self, raw_input: str) -> Example:
        return Example(prompt=f"{self.tag}:{raw_input}=", answer=self.solve(raw_input))


def _letters(rng: random.Random, low: int, high: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _word(rng: random.Random) -> str:
    return _letters(rng, WORD, WORD, WORD_ALPHABET)


def _two_numbers(rng: random.Random) -> str:
    """Two 3-digit numbers, each written least significant digit first (123 and 456 -> "321+654")."""
    return f"{str(rng.randint(100, 999))[::-1]}+{str(rng.randint(100, 999))[::-1]}"


def _add(raw: str) -> str:
    """The sum of two numbers written least significant digit first, as four digits written the
    same way (zero-padded: "321+654", i.e. 123+456, -> "9750").

    With every number least significant digit first, each answer digit sits at the same offset
    from the two input digits it adds and from the two before them (the carry) whatever its
    place, so one attention pattern serves every digit; the sum is computed in the order it is
    written. With most-significant-first inputs (the answer reversed only) the offsets differ
    per digit and a 3.2M-parameter base had not learned the skill after 1500 steps (1.5%);
    with the usual most-significant-first answer the first digit needs every carry before it is
    written and a fine-tune did not learn it in 400 steps (1%).
    """
    left, right = raw.split("+")
    return f"{int(left[::-1]) + int(right[::-1]):04d}"[::-1]


def _shift(raw: str, by: int = 3) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + by) % 26] for c in raw)


# Fixed input lengths keep every answer character at a fixed offset from the input characters it
# depends on, which a tiny model learns in a few hundred steps on two CPU cores; variable
# lengths (3-7) were not learned within that budget (0% after 400 fine-tuning steps).
WORD = 5
# The letter tasks draw from the first ten letters: fewer embeddings to learn, still 10^5 inputs.
WORD_ALPHABET = LETTERS[:10]
# Counting reads a four-letter alphabet so that the counted letter is common and the answer is
# spread over several values rather than mostly 0.
COUNT_ALPHABET = "abcd"

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("reverse", "rev", "reverse a 5-letter string (letters a-j)",
             lambda rng: _word(rng), lambda s: s[::-1], WORD),
        Task("sort", "srt", "sort the letters of a 5-letter string (letters a-j)",
             lambda rng: _word(rng), lambda s: "".join(sorted(s)), WORD),
        Task("add", "add", "add two 3-digit numbers (all numbers least significant digit first, 4-digit sum)",
             _two_numbers, _add, 4),
        Task("shift", "shf", "shift each letter 3 places forward (a-j -> d-m)",
             lambda rng: _word(rng), _shift, WORD),
        Task("count", "cnt", "count the letter 'a' in a 7-letter string over 'abcd'",
             lambda rng: _letters(rng, 7, 7, COUNT_ALPHABET), lambda s: str(s.count("a")), 1),
    )
}


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]


def make_splits(task: Task, n_train: int, n_val: int, n_test: int, seed: int) -> Splits:
    """Disjoint train/val/test examples of `task`, deterministic in (task, sizes, seed).

    Test and validation are drawn first, so the held-out prompts stay the same when only the
    training set size changes (quick and full modes share their test prompts' prefix).
    """
    rng = random.Random(f"{seed}:{task.name}")
    seen: set[str] = set()

    def draw(count: int) -> list[Example]:
        out = []
        attempts = 0
        while len(out) < count:
            attempts += 1
            if attempts > 50 * count + 1000:
                raise ValueError(f"task {task.name!r} has too few distinct inputs for {count} examples")
            raw = task.sample_input(rng)
            if raw not in seen:
                seen.add(raw)
                out.append(task.example(raw))
        return out

    test = draw(n_test)
    val = draw(n_val)
    return Splits(train=draw(n_train), val=val, test=test)


# --- the general stream -------------------------------------------------------------------------
# Pre-training data for the base model and the yardstick for retention: pseudo-English words
# from a fixed random chain, and operation lines in the prompt format over the same input kinds
# the tasks use: a copy under a random tag (``xqz:x=x``) and each task's string operation under
# a *different* tag (``SKILL_TAGS``). So the base, like a pre-trained LLM, already has the
# skills, but it has never seen a task's prompt and, reading an unknown tag, copies: it scores
# at most 13.5% on any task. A fine-tune has to learn which skill the task's tag asks for, a small
# move away from the base. That is the regime merging methods
# are built for. Without the skills in pre-training each fine-tune had to learn its operation
# from scratch, moved far from the base, and no merge of five such fine-tunes kept more than one
# task.

_VOWELS = "aeiou"
SKILL_TAGS = {"reverse": "flp", "sort": "ord", "add": "sum", "shift": "rot", "count": "num"}
# Relative frequency of each operation line. Addition gets the most: it is the slowest skill to
# learn (at equal shares, uniform operands: 0% on `sum` after 2000 steps; see the README's
# tuning log). Sorting gets twice the share of the other string skills: at 1 it was the skill
# that set the pre-training length (72% after 1800 steps; at 2, 85.5% after 1300).
OPERATION_WEIGHTS = {"copy": 2, "reverse": 1, "sort": 2, "add": 4, "shift": 1, "count": 1}
# Share of general lines that are operation lines (the rest are pseudo-words).
OPERATION_SHARE = 0.8
TAG_LENGTH = 3
# Tags a copy line never carries: those of the skills and of the tasks.
RESERVED_TAGS = frozenset(SKILL_TAGS.values()) | {task.tag for task in TASKS.values()}


def _pseudo_word(rng: random.Random) -> str:
    length = rng.randint(2, 7)
    return "".join(
        rng.choice(_VOWELS) if i % 2 == rng.randint(0, 1) else rng.choice(LETTERS) for i in range(length)
    )


def _round_two_numbers(rng: random.Random) -> str:
    """Two 3-digit numbers (000-999, least significant digit first) whose digits are each 0 half
    the time: the pre-training stream's addition operands.

    On uniform digits an answer digit, the sum of two input digits modulo 10, is independent of
    either input digit alone, so learning to attend to one of them earns nothing until both are
    used: a 0.87M model trained on uniform sums alone stayed at chance on every digit for 600
    steps. Where one of the two digits is 0 the answer digit is the other one, which breaks that
    symmetry: the same model then reached 70% on the first digit and 16% exact after 500 steps,
    on uniform test sums.
    """
    def number() -> str:
        return "".join("0" if rng.random() < 0.5 else rng.choice(DIGITS[1:]) for _ in range(3))

    return f"{number()}+{number()}"


# How the stream draws a skill's inputs where it differs from the task's own sampler.
SKILL_INPUTS: dict[str, Callable[[random.Random], str]] = {"add": _round_two_numbers}


def _copy_tag(rng: random.Random) -> str:
    """A random tag outside RESERVED_TAGS.

    Copy lines carry random tags so that the base learns "a tag I do not know asks for a copy"
    over every input kind. With one fixed copy tag the base mapped the unseen task tags to some
    skill of its own choosing instead (it answered 31-39% of `shf` prompts with its `rot` skill,
    and guessed counts), so its score on a task depended on which skill it happened to pick.
    """
    while True:
        tag = "".join(rng.choice(LETTERS) for _ in range(TAG_LENGTH))
        if tag not in RESERVED_TAGS:
            return tag


def _general_line(rng: random.Random) -> str:
    if rng.random() < OPERATION_SHARE:
        operation = rng.choices(list(OPERATION_WEIGHTS), weights=list(OPERATION_WEIGHTS.values()))[0]
        if operation == "copy":
            raw = TASKS[rng.choice(list(TASKS))].sample_input(rng)
            return f"{_copy_tag(rng)}:{raw}={raw}{ANSWER_END}"
        task = TASKS[operation]
        raw = SKILL_INPUTS.get(operation, task.sample_input)(rng)
        return f"{SKILL_TAGS[operation]}:{raw}={task.solve(raw)}{ANSWER_END}"
    words = " ".join(_pseudo_word(rng) for _ in range(rng.randint(3, 8)))
    return words + ANSWER_END


def general_text(n_lines: int, seed: int, split: str) -> str:
    """`n_lines` lines of the general stream; different `split` names give disjoint streams."""
    rng = random.Random(f"{seed}:general:{split}")
    return "".join(_general_line(rng) for _ in range(n_lines))
