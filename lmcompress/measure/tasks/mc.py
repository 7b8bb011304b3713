"""Zero-shot multiple choice scored by log-likelihood, as lm-evaluation-harness scores ARC/HellaSwag/PIQA/BoolQ.

Each choice is appended to the context after a space; the prediction is the choice with the highest summed
log-probability (``acc``) or the highest log-probability per character of the choice (``acc_norm``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmcompress.errors import UserError
from lmcompress.measure.intervals import wilson_interval


@dataclass
class MCExample:
    context: str  # everything before the answer, e.g. "Question: ...\nAnswer:"
    choices: list[str]  # the candidate answers, without the leading space
    label: int  # index of the correct choice

    def validate(self, where: str) -> None:
        if len(self.choices) < 2:
            raise UserError(f"{where}: a multiple-choice example needs at least 2 choices, got {len(self.choices)}")
        if isinstance(self.label, bool) or not isinstance(self.label, int):
            raise UserError(f"{where}: label {self.label!r} is not a whole number (the index of the correct choice)")
        if not 0 <= self.label < len(self.choices):
            raise UserError(f"{where}: label {self.label} is not an index into its {len(self.choices)} choices")


DELIMITER = " "


def choice_scores(lm, examples: list[MCExample]) -> list[list[float]]:
    """Summed log-likelihood of every choice of every example (one batched pass over all of them)."""
    pairs = [(ex.context, DELIMITER + choice) for ex in examples for choice in ex.choices]
    flat = lm.loglikelihood(pairs, desc="multiple choice")
    scores, k = [], 0
    for ex in examples:
        scores.append([r[0] for r in flat[k : k + len(ex.choices)]])
        k += len(ex.choices)
    return scores


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def evaluate_mc(lm, examples: list[MCExample]) -> dict:
    """``acc`` and length-normalized ``acc_norm`` over ``examples``, with their standard errors and 95% Wilson
    intervals (``acc_ci``, ``acc_norm_ci``: the examples as a sample)."""
    if not examples:
        raise UserError("the multiple-choice task has no examples")
    scores = choice_scores(lm, examples)
    hits = [_argmax(s) == ex.label for s, ex in zip(scores, examples, strict=True)]
    norm_hits = [
        _argmax([ll / max(len(c), 1) for ll, c in zip(s, ex.choices, strict=True)]) == ex.label
        for s, ex in zip(scores, examples, strict=True)
    ]
    n = len(examples)
    acc, acc_norm = sum(hits) / n, sum(norm_hits) / n
    chance = sum(1 / len(ex.choices) for ex in examples) / n
    return {
        "acc": acc,
        "acc_norm": acc_norm,
        "acc_stderr": _stderr(acc, n),
        "acc_norm_stderr": _stderr(acc_norm, n),
        "acc_ci": list(wilson_interval(sum(hits), n)),
        "acc_norm_ci": list(wilson_interval(sum(norm_hits), n)),
        "chance": chance,
        "n": n,
    }
