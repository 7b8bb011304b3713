"""Where task examples come from: a local JSONL file, a bundled demo file, or a named Hugging Face dataset.

JSONL schema (one object per line):

- multiple choice: ``{"question": str, "choices": [str, ...], "label": int}``; instead of ``question`` a
  ``context`` gives the whole text before the answer verbatim; ``label`` may also be the correct choice's text
  (``"answer": str``).
- factoid QA: ``{"question": str, "answers": [str, ...]}`` (or ``"answer": str``), optional ``"context"``
  (a passage shown before the question).

Named datasets are mapped to those records by the small converters below (pure functions of one HF record,
testable offline); loading them needs ``datasets`` and a network (or the HF cache).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lmcompress.errors import UserError
from lmcompress.measure.tasks.mc import MCExample
from lmcompress.measure.tasks.qa import QAExample

BUNDLED = {"bundled:mc-demo": "mc_demo.jsonl", "bundled:qa-demo": "qa_demo.jsonl"}


# ---------------------------------------------------------------------------------------------- local files


def mc_from_record(rec: dict, where: str = "record") -> MCExample:
    """A multiple-choice example from one record of the documented JSONL schema."""
    choices = rec.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: 'choices' must be a list of strings")
    if "context" in rec:
        context = str(rec["context"])
    elif "question" in rec:
        context = f"Question: {str(rec['question']).strip()}\nAnswer:"
    else:
        raise UserError(f"{where}: a multiple-choice record needs 'question' or 'context'")
    label = rec.get("label", rec.get("answer"))
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        if label not in choices:
            raise UserError(f"{where}: answer {label!r} is not one of the choices")
        label = choices.index(label)
    if label is None:
        raise UserError(f"{where}: a multiple-choice record needs 'label' (index of the correct choice)")
    if isinstance(label, str):
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):  # 1.5, 1.0, [1]: not an index
        raise UserError(f"{where}: label {label!r} is not a whole number (the index of the correct choice)")
    ex = MCExample(context, list(choices), label)
    ex.validate(where)
    return ex


def qa_from_record(rec: dict, where: str = "record") -> QAExample:
    """A factoid QA example from one record of the documented JSONL schema."""
    if "question" not in rec:
        raise UserError(f"{where}: a QA record needs 'question'")
    answers = rec.get("answers", rec.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{where}: 'answers' must be a string or a list of strings")
    ex = QAExample(str(rec["question"]), answers, rec.get("context"), str(rec.get("id", "")))
    ex.validate(where)
    return ex


def read_jsonl(path: Path, text: str | None = None) -> list[dict]:
    """The records of a JSONL file; blank lines are skipped, a bad line is reported with its number."""
    return [rec for _, rec in numbered_records(path, text)]


def numbered_records(path: Path, text: str | None = None) -> list[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line of a JSONL file (see :func:`read_jsonl`)."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{number}: each line must be a JSON object")
        records.append((number, rec))
    if not records:
        raise UserError(f"{path} holds no records")
    return records


# ---------------------------------------------------------------------------------------------- HF datasets


def _preprocess(text: str) -> str:
    """HellaSwag's WikiHow markup removed (as lm-evaluation-harness does)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _arc(rec: dict) -> dict:
    labels = list(rec["choices"]["label"])
    return {
        "question": rec["question"],
        "choices": list(rec["choices"]["text"]),
        "label": labels.index(rec["answerKey"]),
    }


def _openbookqa(rec: dict) -> dict:
    labels = list(rec["choices"]["label"])
    return {
        "context": rec["question_stem"],
        "choices": list(rec["choices"]["text"]),
        "label": labels.index(rec["answerKey"]),
    }


def _hellaswag(rec: dict) -> dict:
    ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
    return {
        "context": _preprocess(rec["activity_label"] + ": " + ctx),
        "choices": [_preprocess(e) for e in rec["endings"]],
        "label": int(rec["label"]),
    }


def _piqa(rec: dict) -> dict:
    return {"question": rec["goal"], "choices": [rec["sol1"], rec["sol2"]], "label": int(rec["label"])}


def _boolq(rec: dict) -> dict:
    return {
        "context": f"{rec['passage']}\nQuestion: {rec['question']}?\nAnswer:",
        "choices": ["no", "yes"],
        "label": int(bool(rec["answer"])),
    }


def _triviaqa(rec: dict) -> dict:
    answer = rec["answer"]
    aliases = [answer["value"], *answer.get("aliases", [])]
    return {"question": rec["question"], "answers": list(dict.fromkeys(a for a in aliases if a))}


def _nq_open(rec: dict) -> dict:
    return {"question": rec["question"], "answers": list(rec["answer"])}


def _web_questions(rec: dict) -> dict:
    return {"question": rec["question"], "answers": list(rec["answers"])}


@dataclass(frozen=True)
class HFTask:
    kind: str  # "mc" or "qa"
    path: str
    name: str | None
    split: str
    convert: Callable[[dict], dict]  # HF record -> record of the JSONL schema
    shots_split: str | None = None  # where k-shot QA examples are drawn from


HF_TASKS: dict[str, HFTask] = {
    "arc_easy": HFTask("mc", "allenai/ai2_arc", "ARC-Easy", "test", _arc),
    "arc_challenge": HFTask("mc", "allenai/ai2_arc", "ARC-Challenge", "test", _arc),
    "hellaswag": HFTask("mc", "Rowan/hellaswag", None, "validation", _hellaswag),
    "piqa": HFTask("mc", "ybisk/piqa", None, "validation", _piqa),
    "boolq": HFTask("mc", "google/boolq", None, "validation", _boolq),
    "openbookqa": HFTask("mc", "allenai/openbookqa", "main", "test", _openbookqa),
    "triviaqa": HFTask("qa", "mandarjoshi/trivia_qa", "rc.nocontext", "validation", _triviaqa, "train"),
    "nq_open": HFTask("qa", "google-research-datasets/nq_open", None, "validation", _nq_open, "train"),
    "web_questions": HFTask("qa", "stanfordnlp/web_questions", None, "test", _web_questions, "train"),
}


def convert_hf_record(task: str, rec: dict) -> MCExample | QAExample:
    """One HF record of a named task as an example (what ``load_examples`` does for every row)."""
    spec = HF_TASKS[task]
    record = spec.convert(rec)
    where = f"{task} record"
    return mc_from_record(record, where) if spec.kind == "mc" else qa_from_record(record, where)


def _load_hf_rows(task: str, split: str, limit: int | None) -> list[dict]:
    spec = HF_TASKS[task]
    try:
        import datasets
    except ImportError:
        raise UserError(f'task {task!r} needs the `datasets` package: pip install -e ".[hf]"') from None
    sel = split if limit is None else f"{split}[:{limit}]"
    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=sel)
    except Exception as exc:  # network, missing dataset, script-based dataset: all reported the same way
        raise UserError(
            f"could not load dataset {spec.path} ({spec.name or 'default'}, split {split}) for task {task!r}: "
            f"{exc}. Without a network, give a local JSONL file instead (see docs/evaluation.md)"
        ) from None
    return list(ds)


# ---------------------------------------------------------------------------------------------- entry point


def load_examples(kind: str, source: str, *, limit: int | None = None, shots: int = 0):
    """``(examples, shot_pool, description)`` for ``mc`` or ``qa`` from a JSONL file, a bundled demo file or a
    named dataset. ``shot_pool`` is ``None`` when shots are drawn from the examples themselves."""
    convert = mc_from_record if kind == "mc" else qa_from_record
    if source in BUNDLED:
        text = resources.files("lmcompress.assets").joinpath(BUNDLED[source]).read_text(encoding="utf-8")
        records = numbered_records(Path(source), text)
        desc = source
    elif Path(source).expanduser().is_file():
        path = Path(source).expanduser()
        records = numbered_records(path)
        desc = f"file:{path.resolve()}"
    elif source in HF_TASKS:
        spec = HF_TASKS[source]
        if spec.kind != kind:
            raise UserError(f"{source} is a {spec.kind} task; write it as {spec.kind}:{source}")
        examples = [convert_hf_record(source, r) for r in _load_hf_rows(source, spec.split, limit)]
        pool = None
        if kind == "qa" and shots > 0 and spec.shots_split:
            pool = [convert_hf_record(source, r) for r in _load_hf_rows(source, spec.shots_split, max(100, shots))]
        return examples, pool, f"hf:{spec.path}:{spec.name or ''}@{spec.split}"
    else:
        names = ", ".join(n for n, s in HF_TASKS.items() if s.kind == kind)
        raise UserError(
            f"{kind} task {source!r} is neither an existing JSONL file nor a known dataset; give a .jsonl path, "
            f"one of {', '.join(b for b in BUNDLED if kind in b)}, or one of: {names}"
        )
    examples = [convert(r, f"{desc}:{number}") for number, r in records]
    if limit is not None:
        # shots come from the records past the limit when there are enough of them (never the question itself)
        rest = examples[limit:]
        pool = rest if kind == "qa" and shots > 0 and len(rest) >= shots else None
        return examples[:limit], pool, desc
    return examples, None, desc
