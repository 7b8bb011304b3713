"""Evaluation beyond perplexity: task specs (``ppl:FILE,mc:TASK,qa:TASK,qa,retrieval``), loaded once and run on
any number of models (dense, then every point of a sweep). A bare ``qa`` is the generated passage QA of
``planted_qa`` (offline).

A task's result is a dict of numbers; ``run_tasks`` also returns them flattened as ``"task/metric"`` with the
direction of each (perplexity: lower is better), the headline metric of each task, which is what
``sweep`` records and ``report`` plots, and the 95% interval of each metric that has one (``intervals``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lmcompress.calibration.data import embedding_rows, eval_windows, load_text, wants_bos
from lmcompress.errors import UserError
from lmcompress.measure.perplexity import perplexity
from lmcompress.measure.tasks import planted_qa, retrieval
from lmcompress.measure.tasks.lm import LM
from lmcompress.measure.tasks.mc import MCExample, evaluate_mc
from lmcompress.measure.tasks.qa import QAExample, evaluate_qa, exact_match, f1_score, normalize_answer
from lmcompress.measure.tasks.sources import HF_TASKS, load_examples

KINDS = ("ppl", "mc", "qa", "retrieval")
__all__ = [
    "HF_TASKS",
    "LM",
    "MCExample",
    "QAExample",
    "Task",
    "TaskSpec",
    "exact_match",
    "f1_score",
    "normalize_answer",
    "parse_tasks",
    "prepare_tasks",
    "run_tasks",
]


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # ppl | mc | qa | retrieval
    source: str | None  # file, dataset name, retrieval layout (kv | passage); None: both layouts / generated qa

    def __str__(self) -> str:
        return self.kind if self.source is None else f"{self.kind}:{self.source}"


def parse_tasks(text: str) -> list[TaskSpec]:
    """``"ppl:FILE,mc:TASK,qa:TASK,qa,retrieval"`` → specs; every mistake is a UserError naming the entry."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, sep, source = item.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise UserError(
                f"unknown task {item!r} in tasks: write ppl:FILE, mc:TASK, qa[:TASK] or retrieval[:kv]", param="tasks"
            )
        if kind not in ("retrieval", "qa") and not source.strip():
            raise UserError(f"task {item!r} needs a source: {kind}:FILE_OR_DATASET")
        if kind == "qa" and sep and not source.strip():
            raise UserError(f"task {item!r} needs a source after the colon (or write qa alone: generated passage QA)")
        if kind == "retrieval" and sep and source not in retrieval.KINDS:
            raise UserError(f"unknown retrieval layout {source!r}: write retrieval, retrieval:kv or retrieval:passage")
        specs.append(TaskSpec(kind, source.strip() or None))
    if not specs:
        raise UserError("tasks is empty: give e.g. ppl:test.txt,retrieval", param="tasks")
    return specs


@dataclass
class Task:
    name: str  # key in results, e.g. "ppl:test" or "mc:arc_easy"
    kind: str
    label: str  # what the report calls it, e.g. "factoid QA (triviaqa)"
    data: str  # what was loaded
    metrics: dict[str, bool]  # metric -> higher is better; the first one is the headline
    run: Callable[[LM], dict]
    windows: object = None  # ppl: the token windows (agreement with a reference is measured on them)


_LABELS = {"ppl": "perplexity", "mc": "multiple choice", "qa": "factoid QA", "retrieval": "retrieval"}
_METRICS = {
    "ppl": {"perplexity": False, "nll": False},
    "mc": {"acc_norm": True, "acc": True},
    "qa": {"f1": True, "em": True},
    "retrieval": {"acc": True, "value_prob": True},
}


_WORDS = {
    "acc": "accuracy",
    "acc_norm": "accuracy (length-normalized)",
    "f1": "F1",
    "em": "exact match",
    "value_prob": "value probability",
    "nll": "NLL",
}


def _short(spec: TaskSpec) -> str:
    if spec.source is None:
        return spec.kind
    src = spec.source
    short = Path(src).stem if ("/" in src or Path(src).suffix) else src.removeprefix("bundled:")
    return f"{spec.kind}:{short}"


def prepare_tasks(
    specs: list[TaskSpec],
    tokenizer,
    *,
    seqlen: int,
    max_length: int,
    limit: int | None = None,
    shots: int = 0,
    seed: int = 0,
    retrieval_lengths: list[int] | None = None,
    bos: bool | None = None,
    vocab_size: int | None = None,
) -> list[Task]:
    """Load every task's data once (text windows, examples, generated retrieval prompts). ``bos`` and
    ``vocab_size``: how perplexity windows are cut and checked (see ``calibration.data.eval_windows``)."""
    if limit is not None and limit <= 0:
        raise UserError(f"limit must be positive, got {limit}", param="limit")
    if shots < 0:
        raise UserError(f"shots must be >= 0, got {shots}", param="shots")
    tasks: list[Task] = []
    names: set[str] = set()
    for spec in specs:
        name = _short(spec)
        while name in names:
            name += "'"
        names.add(name)
        several_ppl = sum(s.kind == "ppl" for s in specs) > 1
        named = ":" in name and (spec.kind != "ppl" or several_ppl)
        label = _LABELS[spec.kind] + (f" ({name.split(':', 1)[1]})" if named else "")
        window_options = {"bos": bos, "vocab_size": vocab_size}
        tasks.append(
            _prepare(
                spec, name, label, tokenizer, seqlen, max_length, limit, shots, seed, retrieval_lengths, window_options
            )
        )
    return tasks


def _prepare(spec, name, label, tokenizer, seqlen, max_length, limit, shots, seed, retrieval_lengths, window_options):
    metrics = dict(_METRICS[spec.kind])
    if spec.kind == "ppl":
        text = load_text(spec.source, role="eval")
        bos = wants_bos(tokenizer) if window_options["bos"] is None else window_options["bos"]
        windows = eval_windows(tokenizer, text.text, seqlen, bos=bos, vocab_size=window_options["vocab_size"])
        if limit is not None:
            windows = windows[:limit]

        def run(lm: LM) -> dict:
            return asdict(perplexity(lm.model, windows, device=lm.device, progress=lm.progress)) | {"bos": bos}

        return Task(name, "ppl", label, text.description, metrics, run, windows)
    if spec.kind == "qa" and spec.source is None:
        return _planted_qa(name, tokenizer, max_length, limit, seed, retrieval_lengths)
    if spec.kind in ("mc", "qa"):
        examples, pool, desc = load_examples(spec.kind, spec.source, limit=limit, shots=shots)
        if spec.kind == "mc":
            return Task(name, "mc", label, desc, metrics, lambda lm: evaluate_mc(lm, examples))
        return Task(
            name,
            "qa",
            label,
            desc,
            metrics,
            lambda lm: evaluate_qa(lm, examples, shots=shots, shot_pool=pool, seed=seed),
        )
    kinds = retrieval.KINDS if spec.source is None else (spec.source,)
    lengths = retrieval_lengths or retrieval.default_lengths(max_length)
    too_long = [n for n in lengths if n + 8 > max_length]
    if too_long:
        raise UserError(
            f"retrieval context length(s) {too_long} do not fit the model's context of {max_length} tokens "
            "(with room for the answer); choose shorter retrieval_lengths",
            param="retrieval_lengths",
        )
    encode = lambda s: tokenizer(s, verbose=False)["input_ids"]  # noqa: E731
    cells = len(kinds) * len(lengths) * len(retrieval.DEFAULT_DEPTHS)
    per_cell = 1 if limit is None else max(1, -(-limit // cells))
    examples = retrieval.make_examples(encode, kinds=kinds, lengths=lengths, per_cell=per_cell, seed=seed, limit=limit)
    desc = f"generated: {'+'.join(kinds)}, lengths {lengths}, depths {list(retrieval.DEFAULT_DEPTHS)}, seed {seed}"
    return Task(name, "retrieval", label, desc, metrics, lambda lm: retrieval.evaluate_retrieval(lm, examples))


def _planted_qa(name, tokenizer, max_length, limit, seed, lengths) -> Task:
    """The generated passage QA (``planted_qa``): ``lengths`` (default 512 and 1024 tokens) are those of
    ``retrieval_lengths`` when given; ``limit`` examples (default 4 per length and depth)."""
    lengths = lengths or planted_qa.default_lengths(max_length)
    too_long = [n for n in lengths if n + 8 > max_length]
    if too_long:
        raise UserError(
            f"QA passage length(s) {too_long} do not fit the model's context of {max_length} tokens (with room for "
            "the answer); choose shorter retrieval_lengths",
            param="retrieval_lengths",
        )
    encode = lambda s: tokenizer(s, verbose=False)["input_ids"]  # noqa: E731
    examples = planted_qa.make_examples(encode, lengths=lengths, n=limit, seed=seed)
    desc = f"generated: passage QA, {len(examples)} examples, lengths {lengths}, seed {seed}"
    return Task(
        name, "qa", "passage QA", desc, dict(_METRICS["qa"]), lambda lm: planted_qa.evaluate_planted_qa(lm, examples)
    )


def run_tasks(lm: LM, tasks: list[Task], harness: Callable[[], dict] | None = None) -> dict:
    """Run every task on ``lm.model``: per-task results plus the flat ``metrics`` / ``higher_is_better`` /
    ``headline`` views. ``harness`` (a callable running lm-evaluation-harness) folds its numbers in too."""
    results: dict[str, dict] = {}
    metrics: dict[str, float] = {}
    directions: dict[str, bool] = {}
    intervals: dict[str, list[float]] = {}
    headline: list[str] = []
    labels: dict[str, str] = {}
    for task in tasks:
        start = time.perf_counter()
        result = task.run(lm)
        result["data"] = task.data
        result["time_s"] = time.perf_counter() - start
        results[task.name] = result
        for i, (metric, higher) in enumerate(task.metrics.items()):
            key = f"{task.name}/{metric}"
            metrics[key], directions[key] = float(result[metric]), higher
            if result.get(f"{metric}_ci") is not None:
                intervals[key] = [float(v) for v in result[f"{metric}_ci"]]
            labels[key] = task.label if metric == "perplexity" else f"{task.label} {_WORDS.get(metric, metric)}"
            if i == 0:
                headline.append(key)
    out = {"tasks": results, "metrics": metrics, "higher_is_better": directions, "headline": headline,
           "intervals": intervals}  # fmt: skip
    if harness is not None:
        h = harness()
        out["harness"] = h
        for task, values in h["results"].items():
            for metric, value in values.items():
                key = f"harness:{task}/{metric}"
                if f"{task}/{metric}" in h["higher_is_better"]:
                    metrics[key], directions[key] = value, h["higher_is_better"][f"{task}/{metric}"]
                    labels[key] = f"{task} {metric}"
            first = next((k for k in metrics if k.startswith(f"harness:{task}/")), None)
            if first:
                headline.append(first)
    out["labels"] = labels
    return out


def evaluate_model(
    model,
    tokenizer,
    *,
    tasks: str | list[TaskSpec] | None = None,
    ppl_data: str | None = None,
    harness: str | None = None,
    seqlen: int,
    limit: int | None = None,
    shots: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    retrieval_lengths: list[int] | None = None,
    device: str = "cpu",
    progress: bool = True,
    reference_model=None,
    bos: bool | None = None,
) -> dict:
    """Every requested task on a loaded model. ``ppl_data`` adds a ``ppl:`` task in front (the old
    ``--ppl-data`` option); the first perplexity task's numbers are also given at the top level
    (``perplexity``, ``perplexity_ci``, ``nll``, ``tokens``, ``windows``, ``seqlen``, ``bos``, ``data``) as
    ``eval`` always did. With ``reference_model`` (the dense model), ``agreement`` with it on the first
    perplexity task's windows too (``lmcompress.measure.agreement``; its numbers also in ``metrics``)."""
    specs = parse_tasks(tasks) if isinstance(tasks, str) else list(tasks or [])
    if ppl_data:
        specs.insert(0, TaskSpec("ppl", ppl_data))
    names = [t.strip() for t in (harness or "").split(",") if t.strip()]
    if not specs and not names:
        raise UserError("nothing to evaluate: give tasks, ppl_data or harness", param=("tasks", "ppl_data", "harness"))
    lm = LM(model, tokenizer, device=device, batch_size=batch_size, progress=progress)
    prepared = prepare_tasks(
        specs,
        tokenizer,
        seqlen=seqlen,
        max_length=lm.max_length,
        limit=limit,
        shots=shots,
        seed=seed,
        retrieval_lengths=retrieval_lengths,
        bos=bos,
        vocab_size=embedding_rows(model),
    )
    first_ppl = next((t for t in prepared if t.kind == "ppl"), None)
    if reference_model is not None and first_ppl is None:
        raise UserError(
            "agreement with a reference is measured on perplexity windows: add a ppl task", param="reference"
        )
    run_harness = None
    if names:
        from lmcompress.measure.tasks.harness import _import_lm_eval
        from lmcompress.measure.tasks.harness import run_harness as _harness

        _import_lm_eval()  # fail before any work when lm-eval is missing
        run_harness = lambda: _harness(  # noqa: E731
            model, tokenizer, names, shots=shots, limit=limit, batch_size=batch_size, device=device
        )
    out = run_tasks(lm, prepared, harness=run_harness)
    top = {}
    if first_ppl is not None:
        r = out["tasks"][first_ppl.name]
        top = {k: r[k] for k in ("perplexity", "perplexity_ci", "nll", "tokens", "windows", "seqlen", "bos")}
        top["data"] = r["data"]
        if reference_model is not None:
            top["agreement"] = _agreement_metrics(out, model, reference_model, first_ppl, lm)
    settings = {"tasks": [str(s) for s in specs], "harness": names, "limit": limit, "shots": shots, "seed": seed}
    return {**top, **out, "settings": settings}


_AGREEMENT_LABELS = {
    "kl_mean": "KL divergence to the reference (mean, nats)",
    "kl_median": "KL divergence to the reference (median)",
    "kl_p99": "KL divergence to the reference (99th percentile)",
    "top1_agreement": "top-1 agreement with the reference",
    "delta_p_mean": "change in the probability of the right token",
}


def _agreement_metrics(out: dict, model, reference, task: Task, lm: LM) -> dict:
    """Agreement with ``reference`` on ``task``'s windows, also folded into ``out``'s flat views."""
    from lmcompress.measure.agreement import HIGHER_IS_BETTER, agreement

    result = agreement(model, reference, task.windows, device=lm.device, progress=lm.progress)
    for metric, higher in HIGHER_IS_BETTER.items():
        key = f"agreement/{metric}"
        out["metrics"][key], out["higher_is_better"][key] = result[metric], higher
        out["labels"][key] = _AGREEMENT_LABELS[metric]
        if result.get(f"{metric}_ci") is not None:
            out["intervals"][key] = result[f"{metric}_ci"]
    return result
