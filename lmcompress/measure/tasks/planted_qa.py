"""Passage QA made up by lmcompress: questions answered from facts planted in distractor prose (offline).

Each example is one prompt of about ``length`` tokens: filler prose (a bundled WikiText-2 sample) with
``people`` short facts of one kind planted at different depths, all about different invented people and
each with a different value ("Velmora works as a baker.", "Drastel works as a carpenter.", ...), then one
worked question about one of the other people and its answer, then the question about the target person:

    <prose ... Velmora works as a baker. ... prose ... Drastel works as a carpenter. ... prose>

    Question: What is Drastel's job?
    Answer: carpenter

    Question: What is Velmora's job?
    Answer:

Unlike ``retrieval`` the prompt does not end with the start of the fact: the model has to match the name
in a question to the right one of several facts of the same kind (the distractors), and to answer in the
format of the worked question. The target fact sits at a chosen depth (0: the start of the prose, 1: its
end). Scores: exact match and token F1 of the greedy one-line answer (``qa``'s SQuAD normalization), with
95% intervals over examples, and exact match by depth and by length.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from lmcompress.errors import UserError
from lmcompress.measure.intervals import mean_interval, wilson_interval
from lmcompress.measure.tasks.qa import exact_match, f1_score
from lmcompress.measure.tasks.retrieval import DEFAULT_DEPTHS, _clean_filler, _default_filler, _names, fitting_filler

# kind -> (fact template, question template, values); every value is one lowercase word or a number
FACTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "job": (
        "{name} works as a {value}.",
        "What is {name}'s job?",
        ("baker", "carpenter", "doctor", "farmer", "fisherman", "painter", "pilot", "sailor", "teacher", "tailor"),
    ),
    "colour": (
        "{name}'s favourite colour is {value}.",
        "What is {name}'s favourite colour?",
        ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "pink"),
    ),
    "pet": (
        "{name} has a pet {value}.",
        "What pet does {name} have?",
        ("cat", "dog", "parrot", "goat", "rabbit", "turtle", "horse", "hamster", "snake", "goldfish"),
    ),
    "age": ("{name} is {value} years old.", "How old is {name}?", tuple(str(n) for n in range(21, 90))),
}
HEADER = "Read the text, then answer the questions about the people in it.\n\n"


@dataclass
class PlantedQAExample:
    context: str  # header, prose with the planted facts, and the worked question with its answer
    question: str
    answer: str
    kind: str  # which fact (job, colour, pet, age)
    length: int  # target prompt length in tokens
    tokens: int  # actual prompt length in tokens
    depth: float  # where the asked-about fact sits in the prose: 0 = start, 1 = end

    @property
    def prompt(self) -> str:
        return f"{self.context}\nQuestion: {self.question}\nAnswer:"


def _plant(chunk: str, facts: list[tuple[float, str]]) -> str:
    """``chunk`` with each fact inserted at the sentence end (else word boundary) nearest its depth."""
    ends = [0, len(chunk)] + [m.end() for m in re.finditer(r"[.!?] +", chunk)]
    spaces = [0, len(chunk)] + [m.end() for m in re.finditer(r" +", chunk)]
    places = []
    for depth, fact in facts:
        target = depth * len(chunk)
        at = min(ends, key=lambda b: abs(b - target))
        if abs(at - target) > 0.1 * len(chunk):  # no sentence end close by: the nearest word boundary
            at = min(spaces, key=lambda b: abs(b - target))
        places.append((at, fact))
    out, last = [], 0
    for at, fact in sorted(places, key=lambda p: p[0]):  # stable: facts at one place keep their order
        out.append(chunk[last:at])
        if out[-1] and not out[-1].endswith(" "):
            out.append(" ")
        out.append(fact + " ")
        last = at
    out.append(chunk[last:])
    return "".join(out).rstrip()


def _example(encode, rng: random.Random, text: str, length: int, depth: float, kind: str, people: int):
    template, question, values = FACTS[kind]
    names = _names(rng, people)
    chosen = rng.sample(values, people)
    facts = [template.format(name=n, value=v) for n, v in zip(names, chosen, strict=True)]
    # the target is person 0 at ``depth``; the others at random depths; person 1 is the worked question
    depths = [depth] + [rng.random() for _ in range(people - 1)]
    shot = f"\n\nQuestion: {question.format(name=names[1])}\nAnswer: {chosen[1]}\n"
    ask = question.format(name=names[0])
    tail = f"{shot}\nQuestion: {ask}\nAnswer:"
    chunk = fitting_filler(encode, rng, text, length, HEADER + " ".join(facts) + " " + tail)
    while True:
        context = HEADER + _plant(chunk, list(zip(depths, facts, strict=True))) + shot
        ex = PlantedQAExample(context, ask, chosen[0], kind, length, 0, depth)
        ex.tokens = len(encode(ex.prompt))
        if ex.tokens <= length or not chunk.strip():
            return ex
        chunk = chunk[: chunk.rstrip().rfind(" ") + 1]  # one word less


def make_examples(
    encode: Callable[[str], list[int]],
    *,
    lengths: list[int],
    n: int | None = None,
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    people: int = 4,
    seed: int = 0,
    filler: str | None = None,
) -> list[PlantedQAExample]:
    """``n`` examples (default: 4 per length and depth), cycling through the lengths, depths and fact kinds
    so that any prefix covers them as evenly as possible; deterministic given ``seed``. ``encode`` counts
    tokens; ``people`` (≥ 2) facts per prompt, one of them the worked question's."""
    if not lengths or min(lengths) < 64:
        raise UserError(f"QA passage lengths must be at least 64 tokens, got {lengths}", param="retrieval_lengths")
    if not 2 <= people <= 10:
        raise UserError(f"people must be between 2 and 10 (facts per passage), got {people}")
    text = _clean_filler(filler or _default_filler())
    if len(text) < 200:
        raise UserError("the QA filler text is too short; give at least a few paragraphs")
    kinds = list(FACTS)
    cells = [(length, d) for d in depths for length in sorted(lengths)]
    total = 4 * len(cells) if n is None else n
    if total < 1:
        raise UserError(f"the QA task needs at least one example, got {total}", param="limit")
    out = []
    for i in range(total):
        length, depth = cells[i % len(cells)]
        kind = kinds[(i // len(cells) + i) % len(kinds)]
        rng = random.Random(f"{seed}/planted-qa/{i}")
        out.append(_example(encode, rng, text, length, depth, kind, people))
    return out


def evaluate_planted_qa(lm, examples: list[PlantedQAExample], *, max_new_tokens: int = 8) -> dict:
    """Exact match and F1 of greedy one-line answers (means over examples, 95% intervals: Wilson for ``em``,
    Student-t for ``f1``), and exact match by depth, length and fact kind."""
    if not examples:
        raise UserError("the QA task has no examples")
    outputs = lm.generate([ex.prompt for ex in examples], max_new_tokens=max_new_tokens, stop="\n", desc="QA")
    predictions = [o.split("\n", 1)[0] for o in outputs]
    em = [exact_match(p, [ex.answer]) for p, ex in zip(predictions, examples, strict=True)]
    f1 = [f1_score(p, [ex.answer]) for p, ex in zip(predictions, examples, strict=True)]

    def by(attr: str) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for ex, e in zip(examples, em, strict=True):
            groups.setdefault(f"{getattr(ex, attr)}", []).append(e)
        return {k: sum(v) / len(v) for k, v in groups.items()}

    n = len(examples)
    f1_ci = mean_interval(f1)
    return {
        "f1": sum(f1) / n,
        "em": sum(em) / n,
        "em_ci": list(wilson_interval(sum(em), n)),
        "f1_ci": None if f1_ci is None else list(f1_ci),
        "n": n,
        "shots": 0,  # the worked question inside each prompt is its one example
        "by_depth": by("depth"),
        "by_length": by("length"),
        "by_kind": by("kind"),
        "samples": [
            {"question": ex.question, "answer": ex.answer, "prediction": p.strip(), "depth": ex.depth}
            for ex, p in list(zip(examples, predictions, strict=True))[:5]
        ],
    }


def default_lengths(max_length: int, max_new_tokens: int = 8) -> list[int]:
    """512 and 1024 tokens, or what of them fits the model's context (less room for the answer)."""
    room = max_length - max_new_tokens
    return [n for n in (512, 1024) if n <= room] or [max(64, room)]
