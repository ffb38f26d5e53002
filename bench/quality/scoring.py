"""Pure score arithmetic: exact match, and the continual-learning summaries.

Kept free of models and torch so the definitions are unit-tested directly.
"""

from __future__ import annotations


def exact_match_accuracy(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions equal to their answer, character for character."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("exact-match accuracy of an empty set is undefined")
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)


def continual_summary(accuracy_by_step: list[dict[str, float]], order: list[str]) -> list[dict]:
    """Average accuracy and forgetting after each step of a task sequence.

    `accuracy_by_step[k]` maps task name -> accuracy after learning `order[k]` (tasks not yet
    seen may be present and are ignored). After step k: average accuracy is the mean over the
    tasks seen so far, order[:k+1]; a seen task's forgetting is its best accuracy at any earlier
    step since it arrived minus its accuracy now (never negative), and the step's forgetting is
    the mean over the tasks seen before this step (0 at the first step, which has none).
    """
    if len(accuracy_by_step) > len(order):
        raise ValueError(f"{len(accuracy_by_step)} steps for a sequence of {len(order)} tasks")
    summary = []
    for step, scores in enumerate(accuracy_by_step):
        seen = order[: step + 1]
        average = sum(scores[t] for t in seen) / len(seen)
        drops = []
        for arrived, task in enumerate(order[:step]):
            best = max(accuracy_by_step[k][task] for k in range(arrived, step + 1))
            drops.append(best - scores[task])
        forgetting = sum(drops) / len(drops) if drops else 0.0
        summary.append({"step": step + 1, "task": order[step], "average_accuracy": average,
                        "forgetting": forgetting})
    return summary
