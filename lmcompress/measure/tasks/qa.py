"""Factoid QA: k-shot prompt, greedy answer up to the end of the line, exact match and F1 (the SQuAD /
TriviaQA answer normalization; the LLM-KICK protocol). Scores are the maximum over the answer's aliases."""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field

from lmcompress.errors import UserError
from lmcompress.measure.intervals import mean_interval, wilson_interval


@dataclass
class QAExample:
    question: str
    answers: list[str]  # every accepted answer (aliases)
    context: str | None = None  # an optional passage shown before the question
    id: str = ""
    meta: dict = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if not self.question.strip():
            raise UserError(f"{where}: empty question")
        if not any(a.strip() for a in self.answers):
            raise UserError(f"{where}: a QA example needs at least one non-empty answer")


_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace (SQuAD's normalization)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: list[str]) -> float:
    """Token-overlap F1 of the normalized prediction against the best-matching answer."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(a).split()) for a in answers)


def _block(ex: QAExample) -> str:
    passage = f"{ex.context.strip()}\n" if ex.context else ""
    return f"{passage}Question: {ex.question.strip()}\nAnswer:"


def build_prompt(example: QAExample, shots: list[QAExample]) -> str:
    """``k`` solved examples (first answer each), then the question; the model continues after "Answer:"."""
    solved = "".join(f"{_block(s)} {s.answers[0].strip()}\n\n" for s in shots)
    return solved + _block(example)


def pick_shots(pool: list[QAExample], k: int, index: int, seed: int, same_pool: bool) -> list[QAExample]:
    """``k`` examples from ``pool`` drawn with a per-example seed, never the example itself."""
    if k <= 0:
        return []
    candidates = [i for i in range(len(pool)) if not (same_pool and i == index)]
    if len(candidates) < k:
        raise UserError(
            f"shots {k} needs at least {k} other QA examples to draw from, found {len(candidates)}", param="shots"
        )
    rng = random.Random(seed * 1_000_003 + index)
    return [pool[i] for i in rng.sample(candidates, k)]


def evaluate_qa(
    lm,
    examples: list[QAExample],
    *,
    shots: int = 0,
    shot_pool: list[QAExample] | None = None,
    seed: int = 0,
    max_new_tokens: int = 32,
) -> dict:
    """Exact match and F1 (means over examples, each the max over aliases) of greedy one-line answers.

    Shots come from ``shot_pool`` (e.g. a train split) or, when it is ``None``, from the other examples.
    95% intervals over examples: Wilson for ``em`` (``em_ci``), Student-t for the graded ``f1`` (``f1_ci``).
    """
    if not examples:
        raise UserError("the QA task has no examples")
    same = shot_pool is None
    pool = examples if same else shot_pool
    prompts = [build_prompt(ex, pick_shots(pool, shots, i, seed, same)) for i, ex in enumerate(examples)]
    predictions = lm.generate(prompts, max_new_tokens=max_new_tokens, stop="\n", desc="factoid QA")
    predictions = [p.split("\n", 1)[0] for p in predictions]  # the answer is the first line, whatever the LM
    em = [exact_match(p, ex.answers) for p, ex in zip(predictions, examples, strict=True)]
    f1 = [f1_score(p, ex.answers) for p, ex in zip(predictions, examples, strict=True)]
    n = len(examples)
    return {
        "em": sum(em) / n,
        "f1": sum(f1) / n,
        "em_ci": list(wilson_interval(sum(em), n)),
        "f1_ci": _listed(mean_interval(f1)),
        "n": n,
        "shots": shots,
        "samples": [
            {"question": ex.question, "prediction": p.strip(), "em": e}
            for ex, p, e in list(zip(examples, predictions, em, strict=True))[:5]
        ],
    }


def _listed(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else list(interval)
