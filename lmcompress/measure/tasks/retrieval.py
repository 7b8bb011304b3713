"""In-context retrieval made up by lmcompress: the model must return a value planted in its prompt.

Two layouts, both deterministic given a seed and both scaled to any context length in tokens:

- ``kv``: a list of lines "The code of Velmora is 4821." with the asked-for line at a chosen depth;
- ``passage``: filler prose (a bundled WikiText sample) with one planted sentence at a chosen depth
  ("needle in a haystack").

The prompt ends with the start of the fact ("... The code of Velmora is"), so a model that can look the
fact up only has to copy it. ``acc``: the first word of the greedy one-line answer is the value.
``value_prob``: the geometric-mean probability per token of the value under teacher forcing (a graded
score that still moves when a small model never answers exactly).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from lmcompress.errors import UserError
from lmcompress.measure.intervals import mean_interval, wilson_interval

KINDS = ("kv", "passage")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]


@dataclass
class RetrievalExample:
    prompt: str
    answer: str  # the planted value
    key: str
    kind: str
    length: int  # target prompt length in tokens
    tokens: int  # actual prompt length in tokens
    depth: float  # where the fact sits: 0 = start of the context, 1 = end


def _names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
        word = word.capitalize()
        if word not in seen:
            seen.add(word)
            names.append(word)
    return names


def _values(rng: random.Random, n: int) -> list[str]:
    return [str(v) for v in rng.sample(range(1000, 10000), n)]


def _fill(encode: Callable[[str], list[int]], pieces: list[str], fixed: str, length: int) -> int:
    """How many of ``pieces`` fit, with ``fixed`` text, in ``length`` tokens (counted piece by piece)."""
    budget = length - len(encode(fixed))
    used, count = 0, 0
    for piece in pieces:
        cost = len(encode(piece))
        if used + cost > budget:
            break
        used, count = used + cost, count + 1
    return count


def _kv_example(encode, rng: random.Random, length: int, depth: float) -> RetrievalExample:
    header = "Remember these codes.\n"
    guess = max(4, length // 4)  # far more lines than can fit; trimmed below
    while True:
        names, values = _names(rng, guess), _values(rng, min(guess, 9000))
        lines = [f"The code of {n} is {v}.\n" for n, v in zip(names, values, strict=False)]
        count = _fill(encode, lines, header + "\nThe code of Xxxxxxx is", length)
        if count < len(lines) or guess >= 9000:
            break
        guess *= 2
    if count < 2:
        raise UserError(
            f"retrieval context of {length} tokens is too short for a key-value list; use longer retrieval_lengths",
            param="retrieval_lengths",
        )
    while True:
        lines = lines[:count]
        target = round(depth * (count - 1))
        key, value = names[target], values[target]
        prompt = header + "".join(lines) + f"\nThe code of {key} is"
        tokens = len(encode(prompt))
        if tokens <= length or count <= 2:
            return RetrievalExample(prompt, value, key, "kv", length, tokens, depth)
        count -= 1


def _clean_filler(filler: str) -> str:
    """The filler as one line of prose (headings and blank lines dropped)."""
    lines = (line.strip() for line in filler.splitlines())
    return " ".join(line for line in lines if line and not line.startswith("="))


def fitting_filler(encode, rng: random.Random, text: str, length: int, fixed: str) -> str:
    """The most prose from a random sentence start of ``text`` (wrapping around) that fits, with ``fixed`` beside
    it, in ``length`` tokens (found by bisection on characters), cut at a word boundary."""
    starts = [0] + [m.end() for m in re.finditer(r"[.!?] +", text)]
    start = rng.choice(starts[:-1] or [0])
    pool = text[start:] + " " + text[:start]
    lo, hi = 0, min(len(pool), length * 16)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(fixed + pool[:mid])) <= length:
            lo = mid
        else:
            hi = mid - 1
    chunk = pool[:lo]
    return chunk[: chunk.rfind(" ") + 1] if " " in chunk else chunk


def _passage_example(encode, rng: random.Random, length: int, depth: float, text: str) -> RetrievalExample:
    (key,), (value,) = _names(rng, 1), _values(rng, 1)
    needle = f"The secret code of {key} is {value}. "
    question = f"\n\nWhat is the secret code of {key}? The secret code of {key} is"
    chunk = fitting_filler(encode, rng, text, length, needle + question)
    while True:
        target = depth * len(chunk)
        bounds = [0, len(chunk)] + [m.end() for m in re.finditer(r"[.!?] +", chunk)]
        at = min(bounds, key=lambda b: abs(b - target))
        if abs(at - target) > 0.1 * len(chunk):  # no sentence end close by: the nearest word boundary
            spaces = [0, len(chunk)] + [m.end() for m in re.finditer(r" +", chunk)]
            at = min(spaces, key=lambda b: abs(b - target))
        prompt = chunk[:at] + needle + chunk[at:].rstrip() + question
        tokens = len(encode(prompt))
        if tokens <= length or not chunk.strip():
            return RetrievalExample(prompt, value, key, "passage", length, tokens, depth)
        chunk = chunk[: chunk.rstrip().rfind(" ") + 1]  # one word less


def make_examples(
    encode: Callable[[str], list[int]],
    *,
    kinds: tuple[str, ...] = KINDS,
    lengths: list[int],
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    per_cell: int = 1,
    seed: int = 0,
    filler: str | None = None,
    limit: int | None = None,
) -> list[RetrievalExample]:
    """Examples for every kind × length × depth (``per_cell`` each), interleaved so that the first
    ``limit`` still cover every cell as evenly as possible. ``encode`` counts tokens."""
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"unknown retrieval layout {kind!r}: choose {' or '.join(KINDS)}")
    if not lengths or min(lengths) < 32:
        raise UserError(f"retrieval context lengths must be at least 32 tokens, got {lengths}")
    text = _clean_filler(filler or _default_filler()) if "passage" in kinds else ""
    if "passage" in kinds and len(text) < 200:
        raise UserError("the retrieval filler text is too short; give at least a few paragraphs")
    cells = [(k, n, d) for k in kinds for n in sorted(lengths) for d in depths]
    out: list[RetrievalExample] = []
    for rep in range(per_cell):
        for c, (kind, length, depth) in enumerate(cells):
            rng = random.Random(f"{seed}/{kind}/{length}/{depth}/{rep}/{c}")
            if kind == "kv":
                out.append(_kv_example(encode, rng, length, depth))
            else:
                out.append(_passage_example(encode, rng, length, depth, text))
            if limit is not None and len(out) >= limit:
                return out
    return out


def _default_filler() -> str:
    from lmcompress.calibration.data import load_text

    return load_text("bundled:wikitext2-valid").text


def default_lengths(max_length: int, max_new_tokens: int = 8, longest: int = 2048) -> list[int]:
    """Powers of two from 128 up to the model's context (less room for the answer), at most ``longest``."""
    room = min(max_length - max_new_tokens, longest)
    lengths = [n for n in (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768) if n <= room]
    return lengths or [room]


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'()[]") if words else ""


def evaluate_retrieval(lm, examples: list[RetrievalExample], *, max_new_tokens: int = 8) -> dict:
    """Accuracy of greedy answers (overall, by context length, by depth) and the teacher-forced value_prob,
    with 95% intervals over examples (``acc_ci``: Wilson; ``value_prob_ci``: Student-t, None for one example)."""
    if not examples:
        raise UserError("the retrieval task has no examples")
    answers = lm.generate([ex.prompt for ex in examples], max_new_tokens=max_new_tokens, desc="retrieval")
    hits = [float(first_word(a) == ex.answer) for a, ex in zip(answers, examples, strict=True)]
    scored = lm.loglikelihood([(ex.prompt, " " + ex.answer) for ex in examples], desc="retrieval likelihood")
    probs = [2.718281828459045 ** (ll / max(n, 1)) for ll, _, n in scored]

    def by(attr: str) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for ex, h in zip(examples, hits, strict=True):
            groups.setdefault(f"{getattr(ex, attr)}", []).append(h)
        return {k: sum(v) / len(v) for k, v in groups.items()}

    n = len(examples)
    return {
        "acc": sum(hits) / n,
        "value_prob": sum(probs) / n,
        "acc_ci": list(wilson_interval(sum(hits), n)),
        "value_prob_ci": None if n < 2 else list(mean_interval(probs)),
        "n": n,
        "by_length": by("length"),
        "by_depth": by("depth"),
        "by_kind": by("kind"),
        "samples": [
            {"kind": ex.kind, "tokens": ex.tokens, "depth": ex.depth, "answer": ex.answer, "output": a.strip()}
            for ex, a in list(zip(examples, answers, strict=True))[:5]
        ],
    }
