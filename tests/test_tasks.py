"""Evaluation beyond perplexity: log-likelihood scoring, QA normalization, retrieval prompts, task specs,
dataset mapping, the lm-eval hand-off and `eval --tasks` end to end. Tiny models, offline."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli as run

from lmcompress.errors import UserError
from lmcompress.measure.tasks import LM, parse_tasks, prepare_tasks, run_tasks
from lmcompress.measure.tasks import retrieval as R
from lmcompress.measure.tasks.harness import fold_results, run_harness
from lmcompress.measure.tasks.mc import MCExample, choice_scores, evaluate_mc
from lmcompress.measure.tasks.qa import QAExample, build_prompt, evaluate_qa, exact_match, f1_score, normalize_answer
from lmcompress.measure.tasks.sources import HF_TASKS, convert_hf_record, load_examples, mc_from_record, read_jsonl
from lmcompress.models.tiny import build_tiny_model

MC = [
    MCExample("Question: Which is heavier?\nAnswer:", ["a feather", "a big red brick"], 1),
    MCExample("The cat sat on the", ["mat", "roof of the old house", "chair"], 0),
    MCExample("", ["An empty context is scored from the first token", "Short"], 1),
    MCExample("Numbers: one, two,", ["three", "four five six"], 0),
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tokenizer):
    model = build_tiny_model(request.param, tokenizer.vocab_size, max_positions=256)
    return LM(model, tokenizer, batch_size=3, progress=False)


def hand_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """One unbatched forward of the whole sequence; log-softmax summed over the continuation's positions."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ctx = tokenizer(context.rstrip())["input_ids"] if context.strip() else [prefix]
    whole = tokenizer(context + continuation)["input_ids"]
    if not context.strip():
        whole = [prefix, *whole]
    n = len(ctx)
    assert whole[:n] == ctx, "context tokens must prefix the joined tokens in these examples"
    logits = model(torch.tensor([whole]), use_cache=False).logits[0]
    logp = F.log_softmax(logits.float(), dim=-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n, len(whole)))


def test_choice_loglikelihoods_equal_hand_sums_from_logits(lm, tokenizer):
    scores = choice_scores(lm, MC)
    for ex, row in zip(MC, scores, strict=True):
        for choice, got in zip(ex.choices, row, strict=True):
            want = hand_loglik(lm.model, tokenizer, ex.context, " " + choice)
            assert got == pytest.approx(want, abs=1e-4), (ex.context, choice)


def test_acc_and_acc_norm_follow_the_scores(lm):
    scores = choice_scores(lm, MC)
    result = evaluate_mc(lm, MC)
    acc = sum(max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, MC, strict=True)) / len(MC)
    norm = [[v / len(c) for v, c in zip(s, ex.choices, strict=True)] for s, ex in zip(scores, MC, strict=True)]
    acc_norm = sum(max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(norm, MC, strict=True)) / len(MC)
    assert result["acc"] == acc and result["acc_norm"] == acc_norm and result["n"] == 4
    assert result["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 1 / 2) / 4)


def test_acc_norm_divides_by_the_characters_of_the_choice_without_the_delimiter():
    """lm-evaluation-harness's acc_norm: log-likelihood / len(choice) in characters, the leading space not counted.

    "ab": -2.0 / 2 = -1.0 and "abcd": -3.5 / 4 = -0.875 → acc_norm picks "abcd" (acc picks "ab"); counting the
    space (-2/3 vs -3.5/5) or tokens (1 each) would pick "ab". "éé": -2.1 / 2 = -1.05 and "xyz": -3.0 / 3 = -1.0 →
    "xyz"; counting UTF-8 bytes ("é" is 2: -2.1 / 4) would pick "éé".
    """

    class Fixed:
        def __init__(self, table):
            self.table, self.pairs = table, []

        def loglikelihood(self, pairs, desc=""):
            self.pairs += pairs
            return [(self.table[cont], False, 1) for _, cont in pairs]

    stub = Fixed({" ab": -2.0, " abcd": -3.5, " éé": -2.1, " xyz": -3.0})
    examples = [MCExample("Q:", ["ab", "abcd"], 1), MCExample("Q:", ["éé", "xyz"], 1)]
    result = evaluate_mc(stub, examples)
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0
    assert stub.pairs == [("Q:", " ab"), ("Q:", " abcd"), ("Q:", " éé"), ("Q:", " xyz")]


def test_batch_size_does_not_change_scores(lm, tokenizer):
    pairs = [(ex.context, " " + c) for ex in MC for c in ex.choices]
    one = LM(lm.model, tokenizer, batch_size=1, progress=False).loglikelihood(pairs)
    many = LM(lm.model, tokenizer, batch_size=8, progress=False).loglikelihood(pairs)
    for a, b in zip(one, many, strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1:] == b[1:]


def test_greedy_flag_marks_the_models_own_continuation(lm, eval_text):
    """Greedy continuations (decoded, re-encoded to the same tokens) are flagged greedy; others are not."""
    found = 0
    for line in [x for x in eval_text.splitlines() if len(x.split()) > 8][:40]:
        ctx = " ".join(line.split()[:6])
        ids = lm.encode(ctx)
        new: list[int] = []
        for _ in range(2):
            new.append(lm.model(torch.tensor([ids + new])).logits[0, -1].argmax().item())
        cont = lm.tokenizer.decode(new)
        if lm.encode_pair(ctx, cont) != (ids, new):
            continue  # a byte fragment or a merge across the boundary: not the same tokens once re-encoded
        (ll, greedy, n), (_, other, _) = lm.loglikelihood([(ctx, cont), (ctx, " zzzz qqq")])
        assert greedy and n == 2 and ll < 0
        assert not other
        found += 1
    assert found >= 3


def test_batched_greedy_generation_equals_a_hand_loop(lm, calib_text):
    """Left-padded batches through ``generate`` give what argmax over full forwards gives, prompt by prompt."""
    lines = [x for x in calib_text.splitlines() if len(x.split()) > 40][:8]
    prompts = [" ".join(line.split()[:n]) for line, n in zip(lines, [3, 20, 7, 40, 12, 5, 30, 2], strict=False)]

    def hand(prompt: str, n: int = 5) -> str:
        ids, new = lm.encode(prompt), []
        for _ in range(n):
            token = lm.model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if token == lm.tokenizer.eos_token_id:
                break
            new.append(token)
        return lm.tokenizer.decode(new).split("\n")[0]

    assert lm.generate(prompts, max_new_tokens=5) == [hand(p) for p in prompts]  # batch_size 3: mixed padding


def test_generation_stops_at_newline_and_fits_long_prompts(lm):
    long_prompt = "word " * 2000  # far longer than the 256-token context
    (out,) = lm.generate([long_prompt], max_new_tokens=5)
    assert "\n" not in out
    short = lm.generate(["The"], max_new_tokens=40, stop="\n")[0]
    assert "\n" not in short


# ------------------------------------------------------------------------------------------------ QA metrics


def test_answer_normalization_and_scores_on_known_cases():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("banana theatre") == "banana theatre"  # articles only as whole words
    assert exact_match("the Eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert exact_match("Paris", ["Lyon", "paris"]) == 1.0  # max over aliases
    assert f1_score("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert f1_score("the tower in Paris", ["Eiffel Tower"]) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert f1_score("Berlin", ["Eiffel Tower", "Berlin"]) == 1.0
    assert f1_score("nothing shared", ["Eiffel Tower"]) == 0.0
    assert f1_score("", [""]) == 1.0 and f1_score("a", ["x"]) == 0.0  # "a" normalizes to empty


class TableLM:
    """A stub that answers QA/retrieval prompts from a table (what a perfect model would say)."""

    def __init__(self, answer_for):
        self.answer_for = answer_for
        self.prompts: list[str] = []

    def generate(self, prompts, *, max_new_tokens=32, stop="\n", desc=""):
        self.prompts += prompts
        return [self.answer_for(p) for p in prompts]

    def loglikelihood(self, pairs, desc=""):
        return [(0.0, True, 1) for _ in pairs]


QA = [
    QAExample("Who wrote Salt and Ember?", ["Mira Calloway", "Calloway"]),
    QAExample("Into which lake does the Sauvane flow?", ["Lake Pellet"]),
    QAExample("What grain does the mill grind?", ["barley"]),
    QAExample("Who is the mayor of Dunmere?", ["Alma Risk"]),
]


def test_qa_k_shot_prompt_and_scoring_with_a_stub():
    truth = {ex.question: ex.answers[-1] for ex in QA}

    def answer(prompt: str) -> str:
        last = prompt.rsplit("Question: ", 1)[1].split("\n")[0]
        return " The " + truth[last] + "\nQuestion: more"

    stub = TableLM(answer)
    result = evaluate_qa(stub, QA, shots=2, seed=1)
    assert result["em"] == 1.0 and result["f1"] == 1.0
    for ex, prompt in zip(QA, stub.prompts, strict=True):
        assert prompt.endswith(f"Question: {ex.question}\nAnswer:")
        assert prompt.count("Question: ") == 3 and prompt.count(ex.question) == 1  # 2 shots, never itself
    wrong = evaluate_qa(TableLM(lambda p: " Nobody"), QA)
    assert wrong["em"] == 0.0 and wrong["f1"] == 0.0
    with pytest.raises(UserError, match="shots 9"):
        evaluate_qa(stub, QA, shots=9)


def test_build_prompt_shows_passages():
    ex = QAExample("Q?", ["a"], context="Some passage.")
    assert (
        build_prompt(ex, [QAExample("S?", ["yes"])])
        == "Question: S?\nAnswer: yes\n\nSome passage.\nQuestion: Q?\nAnswer:"
    )


# ------------------------------------------------------------------------------------------------ retrieval


def test_retrieval_answers_are_the_planted_facts(tokenizer):
    encode = lambda s: tokenizer(s)["input_ids"]  # noqa: E731
    examples = R.make_examples(encode, lengths=[128, 256], per_cell=2, seed=3)
    assert len(examples) == 2 * 2 * 5 * 2
    for ex in examples:
        assert ex.tokens == len(encode(ex.prompt)) <= ex.length
        assert ex.tokens >= 0.75 * ex.length, (ex.kind, ex.tokens, ex.length)
        if ex.kind == "kv":
            facts = re.findall(r"The code of (\w+) is (\d+)\.", ex.prompt)
            keys = [k for k, _ in facts]
            assert len(keys) == len(set(keys)), "keys must be unique"
            assert dict(facts)[ex.key] == ex.answer
            assert keys.index(ex.key) == round(ex.depth * (len(keys) - 1))
            assert ex.prompt.endswith(f"The code of {ex.key} is")
        else:
            facts = re.findall(rf"The secret code of {ex.key} is (\d+)\.", ex.prompt)
            assert facts == [ex.answer]
            needle = f"The secret code of {ex.key} is {ex.answer}. "
            filler = ex.prompt.index("\n\nWhat is") - len(needle)
            where = ex.prompt.index(needle) / filler
            assert abs(where - ex.depth) < 0.2
    again = R.make_examples(encode, lengths=[128, 256], per_cell=2, seed=3)
    assert [e.prompt for e in again] == [e.prompt for e in examples], "not deterministic"
    other = R.make_examples(encode, lengths=[128, 256], per_cell=2, seed=4)
    assert [e.answer for e in other] != [e.answer for e in examples]


def test_a_model_that_knows_the_answer_scores_one(tokenizer):
    encode = lambda s: tokenizer(s)["input_ids"]  # noqa: E731
    examples = R.make_examples(encode, lengths=[128], seed=0)
    truth = {ex.prompt: ex.answer for ex in examples}
    cheat = R.evaluate_retrieval(TableLM(lambda p: f" {truth[p]}. And more"), examples)
    assert cheat["acc"] == 1.0 and set(cheat["by_depth"].values()) == {1.0}
    wrong = R.evaluate_retrieval(TableLM(lambda p: " 0000"), examples)
    assert wrong["acc"] == 0.0


def test_retrieval_limit_spreads_over_cells_and_lengths_respect_the_context(tokenizer):
    encode = lambda s: tokenizer(s)["input_ids"]  # noqa: E731
    ex = R.make_examples(encode, kinds=("kv",), lengths=[128, 192], per_cell=3, limit=10)
    assert len(ex) == 10 and {e.length for e in ex} == {128, 192}
    assert R.default_lengths(256) == [128] and R.default_lengths(4096, longest=1024) == [128, 256, 512, 1024]
    with pytest.raises(UserError, match="do not fit"):
        prepare_tasks(parse_tasks("retrieval"), tokenizer, seqlen=64, max_length=256, retrieval_lengths=[512])


# ------------------------------------------------------------------------------------------------ specs, data


def test_parse_tasks_and_its_errors():
    specs = parse_tasks("ppl:a.txt, mc:arc_easy,qa:triviaqa,retrieval,retrieval:kv")
    assert [str(s) for s in specs] == ["ppl:a.txt", "mc:arc_easy", "qa:triviaqa", "retrieval", "retrieval:kv"]
    for bad, msg in [("mmlu:x", "unknown task"), ("mc", "needs a source"), ("retrieval:maze", "layout"), ("", "empty")]:
        with pytest.raises(UserError, match=msg):
            parse_tasks(bad)


def test_jsonl_schema_and_bad_files(tmp_path):
    assert mc_from_record({"question": "Q", "choices": ["x", "y"], "answer": "y"}).label == 1
    assert mc_from_record({"context": "C:", "choices": ["x", "y"], "label": 0}).context == "C:"
    with pytest.raises(UserError, match="label 5"):
        mc_from_record({"question": "Q", "choices": ["x", "y"], "label": 5})
    for label in (1.5, 1.0, True, [1]):
        with pytest.raises(UserError, match="not a whole number"):
            mc_from_record({"question": "Q", "choices": ["x", "y"], "label": label})
    halves = tmp_path / "mc.jsonl"
    ok = json.dumps({"question": "Q", "choices": ["x", "y"], "label": 1})
    halves.write_text(f"{ok}\n\n{ok}\n" + json.dumps({"question": "Q", "choices": ["x", "y"], "label": 1.5}) + "\n")
    with pytest.raises(UserError, match=r"mc\.jsonl:4: label 1\.5"):  # the file's line, blank lines counted
        load_examples("mc", str(halves))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "answers": ["a"]}\n{not json}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2"):
        read_jsonl(bad)
    good = tmp_path / "qa.jsonl"
    good.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(6)))
    examples, pool, _ = load_examples("qa", str(good), limit=3, shots=2)
    assert [e.question for e in examples] == ["q0", "q1", "q2"] and [e.question for e in pool] == ["q3", "q4", "q5"]
    with pytest.raises(UserError, match="neither an existing JSONL"):
        load_examples("mc", str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="write it as qa:triviaqa"):
        load_examples("mc", "triviaqa")


FAKE_RECORDS = {
    "arc_easy": {"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "C"},
    "hellaswag": {
        "activity_label": "Baking",
        "ctx_a": "A man mixes flour.",
        "ctx_b": "he",
        "endings": ["bakes [title] bread.", "swims.", "sings.", "runs."],
        "label": "0",
    },
    "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
    "boolq": {"question": "is water wet", "passage": "Water is wet.", "answer": True},
    "openbookqa": {
        "question_stem": "Sun is a",
        "choices": {"text": ["star", "moon"], "label": ["A", "B"]},
        "answerKey": "A",
    },
    "triviaqa": {"question": "Capital of France?", "answer": {"value": "Paris", "aliases": ["Paris", "Paree"]}},
    "nq_open": {"question": "who wrote x", "answer": ["Y", "Z"]},
}


def test_named_dataset_records_map_to_examples():
    arc = convert_hf_record("arc_easy", FAKE_RECORDS["arc_easy"])
    assert arc.label == 2 and arc.context == "Question: Q?\nAnswer:" and arc.choices == ["x", "y", "z"]
    hs = convert_hf_record("hellaswag", FAKE_RECORDS["hellaswag"])
    assert hs.context == "Baking: A man mixes flour. He" and hs.choices[0] == "bakes. bread." and hs.label == 0
    bq = convert_hf_record("boolq", FAKE_RECORDS["boolq"])
    assert bq.choices == ["no", "yes"] and bq.label == 1 and bq.context.endswith("Question: is water wet?\nAnswer:")
    assert convert_hf_record("piqa", FAKE_RECORDS["piqa"]).choices == ["twist the lid", "eat the lid"]
    assert convert_hf_record("openbookqa", FAKE_RECORDS["openbookqa"]).label == 0
    tq = convert_hf_record("triviaqa", FAKE_RECORDS["triviaqa"])
    assert tq.answers == ["Paris", "Paree"] and tq.question == "Capital of France?"
    assert convert_hf_record("nq_open", FAKE_RECORDS["nq_open"]).answers == ["Y", "Z"]
    assert {"arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "triviaqa"} <= set(HF_TASKS)


# ------------------------------------------------------------------------------------------------ harness


def test_harness_without_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install lm-eval"):
        run_harness(torch.nn.Linear(1, 1), None, ["arc_easy"])


def test_harness_gets_the_model_object_and_its_results_are_folded(monkeypatch, tokenizer):
    seen = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size, device):
            seen.update(pretrained=pretrained, tokenizer=tokenizer)

    def simple_evaluate(model, tasks, num_fewshot, limit):
        seen.update(wrapper=model, tasks=tasks, shots=num_fewshot, limit=limit)
        return {
            "results": {
                "arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": 0.01, "acc_norm,none": 0.5}
            },
            "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}},
        }

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate, fake.__version__ = simple_evaluate, "0.0-fake"
    models, hf = types.ModuleType("lm_eval.models"), types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    for name, mod in {"lm_eval": fake, "lm_eval.models": models, "lm_eval.models.huggingface": hf}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256)
    out = run_tasks(
        LM(model, tokenizer, progress=False),
        [],
        harness=lambda: run_harness(model, tokenizer, ["arc_easy"], shots=0, limit=5),
    )
    assert seen["pretrained"] is model and seen["tasks"] == ["arc_easy"] and seen["limit"] == 5
    assert out["metrics"] == {"harness:arc_easy/acc": 0.25, "harness:arc_easy/acc_norm": 0.5}
    assert out["harness"]["results"]["arc_easy"]["acc_stderr"] == 0.01 and out["headline"] == ["harness:arc_easy/acc"]
    results, hib = fold_results({"results": {"t": {"exact_match,strict-match": 1.0}}, "higher_is_better": {}})
    assert results == {"t": {"exact_match[strict-match]": 1.0}} and hib == {"t/exact_match[strict-match]": True}


def test_real_lm_eval_agrees_with_our_multiple_choice_scores(tmp_path, tokenizer):
    """Runs only where lm-eval is installed: the harness, on the same model object and examples, gets our acc."""
    pytest.importorskip("lm_eval")
    examples, _, _ = load_examples("mc", "bundled:mc-demo")
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"q": e.context, "choices": e.choices, "label": e.label}) for e in examples))
    task = {
        "task": "lmcompress_mc_demo",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{q}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256, seed=1)
    theirs = run_harness(model, tokenizer, [task], shots=0, batch_size=4)["results"]["lmcompress_mc_demo"]
    ours = evaluate_mc(LM(model, tokenizer, progress=False), examples)
    assert theirs["acc"] == ours["acc"] and theirs["acc_norm"] == ours["acc_norm"]


# ------------------------------------------------------------------------------------------------ CLI


def test_a_typo_in_tasks_is_reported_before_the_model_is_loaded(tmp_path, capsys):
    assert run(["eval", str(tmp_path / "no-model-here"), "--tasks", "ppl:a.txt,mmlu:x"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'mmlu:x'" in err and "no-model-here" not in err


def test_eval_tasks_cli_end_to_end(tiny_folder, capsys):
    folder = str(tiny_folder("llama"))
    argv = ["eval", folder, "--tasks", "ppl:bundled:wikitext2-test,mc:bundled:mc-demo,qa:bundled:qa-demo,retrieval"]
    assert run([*argv, "--limit", "3", "--shots", "1", "--seqlen", "64", "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seqlen"] == 64 and result["windows"] == 3 and result["tokens"] == 3 * 63 and result["perplexity"] > 1
    assert result["sparsity"] == 0.0 and result["layer_sparsity"]
    assert set(result["tasks"]) == {"ppl:wikitext2-test", "mc:mc-demo", "qa:qa-demo", "retrieval"}
    assert result["metrics"]["ppl:wikitext2-test/perplexity"] == result["perplexity"]
    assert result["higher_is_better"]["ppl:wikitext2-test/perplexity"] is False
    assert result["tasks"]["mc:mc-demo"]["n"] == 3 and 0 <= result["metrics"]["mc:mc-demo/acc"] <= 1
    assert result["tasks"]["retrieval"]["n"] == 3
    for key, value in result["metrics"].items():  # every task score comes with its 95% interval
        if key.endswith(("/perplexity", "/acc", "/acc_norm", "/em", "/f1")):
            lo, hi = result["intervals"][key]
            assert lo <= value <= hi, key
    assert result["perplexity_ci"] == result["intervals"]["ppl:wikitext2-test/perplexity"]
    # the old --ppl-data path keeps its shape, and adds the ppl task in front of --tasks
    assert (
        run(
            [
                "eval",
                folder,
                "--ppl-data",
                "bundled:wikitext2-test",
                "--tasks",
                "retrieval:kv",
                "--limit",
                "2",
                "--json",
                "-q",
            ]
        )
        == 0
    )
    both = json.loads(capsys.readouterr().out)
    assert list(both["tasks"]) == ["ppl:wikitext2-test", "retrieval:kv"] and both["windows"] == 2
    for argv, msg in [
        (["eval", folder, "--tasks", "mmlu:x"], "unknown task"),
        (["eval", folder, "--tasks", "mc:nope.jsonl"], "neither an existing JSONL"),
        (["eval", folder, "--tasks", "retrieval", "--retrieval-lengths", "4096"], "do not fit"),
    ] + (
        []
        if importlib.util.find_spec("lm_eval")
        else [(["eval", folder, "--harness", "arc_easy"], "pip install lm-eval")]
    ):
        assert run(argv) == 2, argv
        assert msg in capsys.readouterr().err


def test_task_intervals_are_wilson_for_hits_and_t_for_graded_scores():
    from lmcompress.measure.intervals import mean_interval, wilson_interval

    class Stub:  # answers "a0" to the first two questions only
        def generate(self, prompts, **kw):
            return ["a0" if i < 2 else "zzz" for i in range(len(prompts))]

    examples = [QAExample(f"q{i}", ["a0" if i < 2 else f"b{i}"]) for i in range(8)]
    res = evaluate_qa(Stub(), examples)
    assert res["em"] == 0.25 and res["em_ci"] == pytest.approx(list(wilson_interval(2, 8)))
    assert res["f1_ci"] == pytest.approx(list(mean_interval([1, 1, 0, 0, 0, 0, 0, 0])))
    assert res["em_ci"][0] > 0 and res["em_ci"][1] < 0.7
