"""Search on a tiny model: exact budgets, baselines, never worse than its seed, resumable, bad input refused."""

from __future__ import annotations

import copy
import re
import shutil

import pytest
import torch

from lmcompress.calibration.data import split_stream
from lmcompress.errors import UserError
from lmcompress.models.tiny import build_tiny_model
from lmcompress.search import loop as loop_module
from lmcompress.search import score as score_module
from lmcompress.search.run import SearchConfig, parse_levels, search
from lmcompress.transforms.prune import measure_sparsity

FAST = {"levels": "0.3:0.9:0.1", "offspring": 4, "survivors": (2, 1), "stage_windows": (1, 2), "method": "wanda"}


@pytest.fixture(scope="module")
def base(tokenizer):
    return build_tiny_model("llama", tokenizer.vocab_size)


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_budget_is_met_exactly_and_the_model_holds_the_allocation(granularity, base, calib, tmp_path):
    model = copy.deepcopy(base)
    config = SearchConfig(target=0.6, granularity=granularity, generations=4, **FAST)
    report = search(model, config, calib[:4], calib[4:6], tmp_path / "work", progress=False)
    assert report.achieved == pytest.approx(0.6, abs=1e-9)
    measured, per_layer = measure_sparsity(model)
    assert measured == pytest.approx(0.6, abs=0.01)  # Wanda rounds per row: within a row's rounding
    assert set(report.layer_levels) == set(per_layer)
    assert report.fitness <= min(report.baselines.values()) + 1e-12  # seeded from the better baseline, elitist
    assert len(report.history) == 4


def test_a_killed_search_resumes_to_the_same_allocation(base, calib, tmp_path, monkeypatch):
    straight = search(
        copy.deepcopy(base),
        SearchConfig(target=0.6, generations=6, **FAST),
        calib[:4],
        calib[4:6],
        tmp_path / "a",
        progress=False,
    )
    partial = search(
        copy.deepcopy(base),
        SearchConfig(target=0.6, generations=3, **FAST),
        calib[:4],
        calib[4:6],
        tmp_path / "b",
        progress=False,
    )
    shutil.rmtree(partial.database)  # the database is rebuilt identically if lost
    calls = []
    real = loop_module.evolve
    monkeypatch.setattr(loop_module, "evolve", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = search(
        copy.deepcopy(base),
        SearchConfig(target=0.6, generations=6, **FAST),
        calib[:4],
        calib[4:6],
        tmp_path / "b",
        progress=False,
    )
    assert len(calls) == 3  # it continued from generation 3
    assert resumed.allocation == straight.allocation
    assert resumed.history == straight.history


def test_bad_settings_are_refused():
    with pytest.raises(UserError, match="outside the levels"):
        SearchConfig(target=0.97, levels="0.3:0.9:0.1").validate()
    with pytest.raises(UserError, match="levels"):
        parse_levels("0.9:0.3:0.1")
    with pytest.raises(UserError, match="time limit"):
        SearchConfig(time_limit_s=0).validate()
    with pytest.raises(UserError, match="granularity"):
        SearchConfig(granularity="row").validate()
    assert parse_levels("0.3:0.5:0.1") == [0.3, 0.4, 0.5]


def test_cli_search_writes_model_recipe_and_history(tiny_folder, tmp_path, calib_text, capsys):
    import json

    import lmcompress
    from lmcompress.cli import main

    src = tiny_folder("llama")
    data = tmp_path / "calib.txt"
    data.write_text(calib_text[:20000])
    out = tmp_path / "evo"
    args = [
        "search",
        str(src),
        "--budget",
        "sparsity=0.5",
        "--method",
        "wanda",
        "--levels",
        "0.3:0.7:0.1",
        "--generations",
        "2",
        "--offspring",
        "3",
        "--survivors",
        "2,1",
        "--stage-windows",
        "1,2",
        "--fitness-windows",
        "2",
        "--calib-data",
        str(data),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "-q",
        "-o",
        str(out),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    recipe = json.loads((out / "lmcompress.json").read_text())
    history = json.loads((out / "search.json").read_text())
    assert recipe["kind"] == "search" and recipe["achieved"] == pytest.approx(0.5)
    assert len(history["history"]) == 2 and {"uniform", "owl"} <= set(history["baselines"]) <= {
        "uniform",
        "owl",
        "additive",
    }
    assert not any(p.name.endswith(".search-work") for p in tmp_path.iterdir())  # cleaned up
    # refine per layer from that output folder: its allocation is one of the starts, scored like the others
    refined = tmp_path / "evo-layers"
    argv = [*args[:-1], str(refined), "--granularity", "layer", "--start", str(out), "--sensitivity-span", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None)
    layers = json.loads((refined / "search.json").read_text())
    assert layers["config"]["start"] == history["layer_levels"] and "start" in layers["baselines"]
    assert layers["fitness"] <= min(v for k, v in layers["baselines"].items() if k != "allocations") + 1e-12
    model, _ = lmcompress.load(out)
    sparsity, _ = measure_sparsity(model)
    assert sparsity == pytest.approx(0.5, abs=0.01)
    with pytest.raises(SystemExit) as exit_info:  # bad budget: clear error, nothing written
        main(["search", str(src), "--budget", "sparsity=0.99", "--levels", "0.3:0.7:0.1", "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and not (tmp_path / "x").exists()
    before = {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()}
    with pytest.raises(SystemExit) as exit_info:  # a negative sensitivity span: refused, nothing written
        main(["search", str(src), "--sensitivity-span", "-1", "-o", str(tmp_path / "y")])
    assert exit_info.value.code == 2 and not (tmp_path / "y").exists()
    with pytest.raises(SystemExit) as exit_info:  # too few held-out windows for the last stage: named by its flags
        main(["search", str(src), "--fitness-windows", "4", "--stage-windows", "2,8", "-o", str(tmp_path / "z")])
    assert exit_info.value.code == 2 and not (tmp_path / "z").exists()
    assert "--fitness-windows (4)" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()} == before  # the source untouched

    # The chosen allocation applied by `prune --allocation`: every layer at the level the search gave it.
    again = tmp_path / "again"
    common = ["--method", "wanda", "--calib-data", str(data), "--nsamples", "4", "--seqlen", "32", "-q"]
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(src), "--allocation", str(out / "search.json"), *common, "-o", str(again)])
    assert exit_info.value.code in (0, None)
    pruned = json.loads((again / "lmcompress.json").read_text())
    assert pruned["allocation"] == "layers" and pruned["layer_targets"] == history["layer_levels"]
    _, per_layer = measure_sparsity(lmcompress.load(again)[0])
    for layer, level in history["layer_levels"].items():
        assert per_layer[layer] == pytest.approx(level, abs=0.02), layer  # Wanda rounds per row
    assert len(set(history["layer_levels"].values())) > 1 or len(set(history["allocation"])) == 1


def test_allocation_files_that_do_not_fit_are_refused(tiny_folder, tmp_path, calib_text, capsys):
    import json

    from lmcompress.cli import main

    def run(argv: list[str]) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        return exit_info.value.code, " ".join(capsys.readouterr().err.split())

    src = str(tiny_folder("llama"))
    data = tmp_path / "calib.txt"
    data.write_text(calib_text[:20000])
    common = ["--method", "wanda", "--calib-data", str(data), "--nsamples", "2", "--seqlen", "32", "-q"]
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    cases = [
        ({"model.layers.0.mlp.down_proj": 0.5}, [], "have no sparsity"),
        ({**{n: 0.5 for n in layers}, "model.layers.9.mlp.up_proj": 0.5}, [], "not layers this run prunes"),
        ({"config": {"kind": "bits"}, "layer_levels": {layers[0]: 3.0}}, [], "bits levels, not sparsities"),
        ({layers[0]: 1.5}, [], r"fractions in \[0, 1\)"),
        ([0.5, 0.7], [], "JSON object of layer name"),
        ({layers[0]: 0.5}, ["--sparsity", "0.5"], "--sparsity does not apply"),
    ]
    for k, (content, extra, message) in enumerate(cases):
        path = tmp_path / f"alloc{k}.json"
        path.write_text(json.dumps(content))
        out = tmp_path / f"out{k}"
        code, err = run(["prune", src, "--allocation", str(path), *extra, *common, "-o", str(out)])
        assert code == 2 and re.search(message, err), (content, err)
        assert not out.exists()
    code, err = run(["prune", src, "--allocation", str(tmp_path / "nope.json"), "-o", str(tmp_path / "x")])
    assert code == 2 and "does not exist" in err


def test_report_of_a_search_draws_history_and_allocation(base, calib, tmp_path):
    import json

    from lmcompress.measure.report import write_report

    report = search(
        copy.deepcopy(base),
        SearchConfig(target=0.6, generations=3, **FAST),
        calib[:4],
        calib[4:6],
        tmp_path / "work",
        progress=False,
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "search.json").write_text(json.dumps(report.to_dict()))
    written = write_report(out)
    assert len(written["plots"]) == 2 and all(
        (out / "plots" / p.split("/")[-1]).stat().st_size > 1000 for p in written["plots"]
    )
    assert "generations" in written["sentences"][0] and (out / "report.html").is_file()
    (out / "search.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a search result"):
        write_report(out)


def test_bits_search_stays_under_the_budget_and_saves_packed_codes(tiny_folder, tmp_path, calib_text):
    import json

    import lmcompress
    from lmcompress.jobs import search_pretrained

    data = tmp_path / "calib.txt"
    data.write_text(calib_text[:20000])
    config = SearchConfig(
        target=4.0,
        kind="bits",
        method="gptq",
        levels="2,3,4,8",
        group_size=32,
        generations=3,
        offspring=3,
        survivors=(2, 1),
        stage_windows=(1, 2),
        fitness_windows=2,
    )
    out = tmp_path / "mixed"
    report = search_pretrained(
        tiny_folder("llama"),
        config,
        out,
        calib_data=str(data),
        nsamples=4,
        seqlen=32,
        progress=False,
    )
    assert 4.0 - 4.0 <= report.achieved <= 4.0 + 1e-9  # within one level step (8 → 4 is the largest) below
    assert set(report.allocation) <= {2.0, 3.0, 4.0, 8.0}
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["storage"] == "packed"
    bits = {e["bits"] for e in recipe["packed"]["tensors"].values() if e["kind"] == "quantized"}
    assert bits <= {2, 3, 4, 8} and len(bits) >= 1
    model, _ = lmcompress.load(out)  # every layer holds at most 2^bits values per grid group of its chosen width
    modules = dict(model.named_modules())
    for layer, bits in report.layer_levels.items():
        w = modules[layer].weight.detach()
        groups = w.reshape(w.shape[0], -1, 32)
        distinct = max(len(torch.unique(groups[r, g])) for r in range(0, w.shape[0], 7) for g in range(groups.shape[1]))
        assert distinct <= 2 ** int(bits), layer
    with pytest.raises(UserError, match="cannot be met"):
        search_pretrained(
            tiny_folder("llama"),
            SearchConfig(target=2.1, kind="bits", method="rtn", group_size=16, fitness_windows=8),
            tmp_path / "no",
            calib_data=str(data),
            nsamples=4,
            seqlen=32,
            progress=False,
        )
    assert not (tmp_path / "no").exists()


def test_max_loss_finds_the_largest_sparsity_within_the_loss(base, calib, tmp_path):
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.search.run import search_max_loss

    model = copy.deepcopy(base)
    config = SearchConfig(target=0.5, generations=1, **FAST)
    report = search_max_loss(model, config, calib[:4], calib[4:6], tmp_path / "w", max_loss=0.05, progress=False)
    steps = report.bisection
    passed = [s["sparsity"] for s in steps if s["within"]]
    failed = [s["sparsity"] for s in steps if not s["within"]]
    assert report.config["target"] == max(passed)
    assert not failed or min(failed) > max(passed)  # the boundary is bracketed
    levels = parse_levels(FAST["levels"])
    nxt = [lv for lv in levels if lv > max(passed)]
    assert not nxt or nxt[0] in failed  # the next level up was tried and failed
    dense = perplexity(base, calib[4:6], progress=False).perplexity
    assert perplexity(model, calib[4:6], progress=False).perplexity <= dense * 1.05 + 1e-6


def test_tune_owl_with_optuna_never_scores_worse_than_default_owl(base, calib, tmp_path):
    from lmcompress.search.tune import ratios_at, tune_owl

    model = copy.deepcopy(base)
    config = SearchConfig(target=0.6, **FAST)
    report = tune_owl(model, config, calib[:4], calib[4:6], tmp_path / "t", trials=5, progress=False)
    assert report.fitness <= report.baselines["owl"] + 1e-12  # the default M, λ is the first trial
    assert len(report.history) == 5 and set(report.tuned) == {"owl_m", "owl_lambda"}
    assert report.achieved == pytest.approx(0.6)
    again = tune_owl(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "t", trials=5, progress=False)
    assert again.tuned == report.tuned  # finished trials are reloaded, not rerun
    ratios = ratios_at([torch.tensor([0.1, 0.5, 1.0, 2.0, 9.0])], 1.5)
    assert ratios == [pytest.approx(0.4)]


def test_scoring_reads_only_changed_layers_and_equals_a_fresh_assembly(base, calib, tmp_path):
    from lmcompress.search.run import prepare

    model = copy.deepcopy(base)
    cand = prepare(model, SearchConfig(target=0.6, **FAST), calib[:4], calib[4:6], tmp_path / "w", progress=False)
    first = cand.place([0.6] * len(cand.units), "uniform")
    second = list(first)
    second[0], second[1] = first[0] + 1, first[1] - 1  # one level switch
    cand.score(first, 1)
    reads = []
    real = cand.db.weight
    cand.db.weight = lambda layer, k: reads.append(layer) or real(layer, k)
    incremental = cand.score(second, 1)
    assert sorted(reads) == sorted(cand.units[0] + cand.units[1])  # only the two switched units were read
    fresh = copy.deepcopy(base)
    cand.db.apply(fresh, cand.assignment(second))
    assert incremental == pytest.approx(cand.fitness(fresh, cand.config.stage_windows[1]), abs=1e-9)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_rounds_rebuild_the_database_along_the_parent_and_resume(base, calib, tmp_path, monkeypatch):
    """A second round rescores the parent on a database built along its own inputs: that candidate is exactly
    sequential pruning at the parent's levels; a run killed inside round 2 resumes to the same allocation."""
    from lmcompress.transforms.prune import PruneConfig, prune

    config = SearchConfig(target=0.6, generations=6, rounds=2, **FAST | {"method": "sparsegpt"})
    straight = search(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "a", progress=False)
    assert len(straight.rounds) == 1 and straight.rounds[0]["generation"] == 3
    assert straight.achieved == pytest.approx(0.6, abs=1e-9)
    parent = straight.rounds[0]["parent"]
    layer_targets = {layer: lv for unit, lv in zip(straight.units, parent, strict=True) for layer in unit}
    sequential = copy.deepcopy(base)
    order = PruneConfig(method="sparsegpt", allocation="layers", layer_targets=layer_targets, in_block="parallel")
    prune(sequential, order, calib[:4], progress=False)  # the database's order: each block's layers from its inputs
    from lmcompress.search.fitness import KLFitness

    fit = KLFitness(base, calib[4:6])
    assert straight.rounds[0]["fitness"] == pytest.approx(fit(sequential, FAST["stage_windows"][-1]), rel=1e-4)

    real = loop_module.evolve
    calls = []

    def dies_in_round_two(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop_module, "evolve", dies_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        search(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "b", progress=False)
    monkeypatch.setattr(loop_module, "evolve", real)
    resumed = search(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "b", progress=False)
    assert resumed.allocation == straight.allocation and resumed.fitness == pytest.approx(straight.fitness)
    assert resumed.rounds == straight.rounds


def test_rounds_need_sequential_inputs():
    with pytest.raises(UserError, match="rounds"):
        SearchConfig(rounds=2, database_inputs="dense").validate()
    with pytest.raises(UserError, match="rounds"):
        SearchConfig(rounds=0).validate()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_prefix_cache_gives_the_full_forward_from_any_block(family, tokenizer, calib):
    from lmcompress.models.families import get_blocks
    from lmcompress.search.fitness import KLFitness, PrefixCache, log_probs

    dense = build_tiny_model(family, tokenizer.vocab_size)
    windows = calib[:2, :32]
    base = copy.deepcopy(dense)
    with torch.no_grad():
        for p in get_blocks(base)[0].parameters():
            p.mul_(0.9)
    prefix = PrefixCache(base, windows)
    assert prefix.usable
    fitness = KLFitness(dense, windows)
    for start in range(1, len(get_blocks(base))):
        model = copy.deepcopy(base)
        with torch.no_grad():  # a candidate that differs from the base from block `start` on
            for p in get_blocks(model)[start].parameters():
                p.mul_(0.5)
        for i in range(2):
            expected = log_probs(model, windows[i : i + 1])[0]
            torch.testing.assert_close(prefix.log_probs(model, i, start), expected, rtol=1e-4, atol=1e-4)
        assert fitness(model, 2, prefix=prefix, start=start) == pytest.approx(fitness(model, 2), rel=1e-4)


def test_sensitivity_pass_matches_direct_scores_and_seeds_the_search(base, calib, tmp_path):
    model = copy.deepcopy(base)
    config = SearchConfig(target=0.6, granularity="layer", generations=0, sensitivity_span=1, **FAST)
    cand = score_module.prepare(model, config, calib[:4], calib[4:6], tmp_path / "work", progress=False)
    start = cand.place([0.6] * len(cand.units), "uniform")
    delta = cand.sensitivity(start, 1, progress=False)
    reference = cand.score(start, 0)
    for u in (0, len(cand.units) - 1):  # the first and the last layer: prefix reads from block 0 and block 1
        for k in (start[u] - 1, start[u] + 1):
            child = list(start)
            child[u] = k
            assert delta[u][k] == pytest.approx(cand.score(child, 0) - reference, abs=1e-5)
        assert delta[u][start[u]] == 0.0 and delta[u][start[u] + 2] is None
    report = search(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "work2", progress=False)
    if "additive" in report.baselines:
        assert report.fitness == pytest.approx(min(report.baselines.values()))
        assert len(report.baseline_allocations["additive"]) == len(report.units)


def test_a_negative_sensitivity_span_is_refused(base, calib, tmp_path):
    with pytest.raises(UserError, match="sensitivity span"):
        search(copy.deepcopy(base), SearchConfig(target=0.6, sensitivity_span=-1, **FAST), calib[:4], calib[4:6],
               tmp_path / "w", progress=False)  # fmt: skip
    assert not (tmp_path / "w").exists()


def test_a_block_search_refined_per_layer_starts_from_its_allocation(base, calib, tmp_path):
    blocks = search(
        copy.deepcopy(base), SearchConfig(target=0.6, generations=3, **FAST), calib[:4], calib[4:6], tmp_path / "w",
        progress=False,
    )  # fmt: skip
    config = SearchConfig(
        target=0.6, granularity="layer", generations=2, sensitivity_span=0, start=blocks.layer_levels, **FAST
    )
    layers = search(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "w", progress=False)
    # every layer starts at its block's level, scored as the block search scored it (same database, same windows)
    assert dict(zip([u[0] for u in layers.units], layers.baseline_allocations["start"], strict=True)) == (
        blocks.layer_levels
    )
    assert layers.baselines["start"] == pytest.approx(blocks.fitness, rel=1e-6)
    assert layers.fitness <= min(layers.baselines.values()) + 1e-12
    assert layers.achieved == pytest.approx(0.6, abs=1e-9)
    assert layers.config["start"] == blocks.layer_levels  # recorded (and part of the resume key)

    import json

    from lmcompress.measure.search_report import layer_grid, write_search_report

    out = tmp_path / "out"
    out.mkdir()
    (out / "search.json").write_text(json.dumps(layers.to_dict()))
    blocks_, kinds, cells = layer_grid(json.loads((out / "search.json").read_text()))
    assert len(blocks_) * len(kinds) == len(cells) == len(layers.units)  # every layer in one cell of the map
    assert cells[(0, kinds[0])] == layers.allocation[0]
    sentence = write_search_report(out)["sentences"][0]
    assert "hand-set rule (start" not in sentence and "given start" in sentence  # a start is not a rule


def test_searches_with_other_fitness_windows_share_the_level_database(base, calib, tmp_path):
    config = SearchConfig(target=0.6, generations=1, **FAST)
    first = search(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "w", progress=False)
    second = search(copy.deepcopy(base), config, calib[:4], calib[6:8], tmp_path / "w", progress=False)
    assert first.database == second.database  # built once: it depends on the calibration windows only
    assert len(list((tmp_path / "w").glob("database-*"))) == 1
    assert len(list((tmp_path / "w").glob("state-*.json"))) == 2  # each fitness its own trajectory


def test_start_files_that_do_not_fit_are_refused(tiny_folder, tmp_path, capsys):
    import json

    from lmcompress.cli import main

    src = str(tiny_folder("llama"))
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    cases = [
        ({"config": {"kind": "bits"}, "layer_levels": {layers[0]: 3.0}}, "holds bits levels"),
        ({layers[0]: 0.5}, "start file's per-layer sparsities do not fit this model: .* have no sparsity"),
        ({"model.layers.9.mlp.up_proj": 0.5}, "not layers this run prunes"),
        ([0.5, 0.7], "JSON object of layer name"),
        ({}, "JSON object of layer name"),
    ]
    for k, (content, message) in enumerate(cases):
        path = tmp_path / f"start{k}.json"
        path.write_text(json.dumps(content))
        out = tmp_path / f"out{k}"
        data = ["--calib-data", "bundled:wikitext2-valid"]
        argv = ["search", src, "--start", str(path), "--levels", "0.3:0.7:0.1", *data]
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--nsamples", "2", "--seqlen", "32", "--fitness-windows", "8", "--generations", "0", "-q",
                  "-o", str(out)])  # fmt: skip
        err = " ".join(capsys.readouterr().err.split())
        assert exit_info.value.code == 2 and re.search(message, err), (content, err)
        assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["search", src, "--start", str(tmp_path / "nope"), "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_children_scored_from_the_parents_cache_match_full_forwards(base, calib, tmp_path):
    import random

    from lmcompress.algorithms.evolution import mutate_many

    model = copy.deepcopy(base)
    config = SearchConfig(target=0.6, granularity="layer", generations=0, sensitivity_span=0, **FAST)
    cand = score_module.prepare(model, config, calib[:4], calib[4:7], tmp_path / "work", progress=False)
    parent = cand.place([0.6] * len(cand.units), "uniform")
    rng = random.Random(0)
    # one window cached (the memory cap), the other scored by the full forward
    scorer = score_module.ParentScorer(cand, max_bytes=1)
    scorer.follow(parent)
    assert scorer.prefix is not None and scorer.prefix.cached == 1
    for _ in range(3):  # children of the parent; then the last one becomes the parent through its capture
        for stage in (0, 1):
            child = mutate_many(cand.space, parent, rng, 2)
            assert scorer(child, stage) == pytest.approx(cand.score(child, stage), rel=1e-5)
        assert scorer.pending is not None and scorer.pending[0] == child
        parent = child
        scorer.follow(parent)
        assert scorer.base == parent
        cand.hold(parent)
        fresh = score_module.PrefixCache(cand.model, scorer.prefix.windows)
        for b, hidden in enumerate(scorer.prefix.hidden):
            torch.testing.assert_close(hidden[0], fresh.hidden[b][0], rtol=0, atol=0)


def test_the_parents_cache_leaves_the_search_unchanged(base, calib, tmp_path, monkeypatch):
    config = SearchConfig(target=0.6, granularity="layer", generations=5, sensitivity_span=0, **FAST)
    calls = {"prefix": 0, "rebased": 0}
    for name in calls:
        method = getattr(score_module.PrefixCache, "logits" if name == "prefix" else name)

        def counted(self, *args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(score_module.PrefixCache, "logits" if name == "prefix" else name, counted)
    cached = search(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "a", progress=False)
    assert calls["prefix"] > 0 and calls["rebased"] > 0  # children ran from the cache; a child became the parent
    monkeypatch.undo()
    monkeypatch.setattr(score_module.ParentScorer, "follow", lambda self, parent: None)  # every child in full
    full = search(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "b", progress=False)
    assert cached.allocation == full.allocation
    assert [h["improved"] for h in cached.history] == [h["improved"] for h in full.history]
    assert cached.fitness == pytest.approx(full.fitness, rel=1e-6)


def test_loss_upper_bound_matches_a_direct_computation():
    import math

    from lmcompress.measure.perplexity import increase_upper_bound

    dense = [3.0, 3.2, 2.9, 3.1]
    pruned = [3.05, 3.30, 2.93, 3.12]
    d = [a - b for a, b in zip(pruned, dense, strict=True)]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    assert increase_upper_bound(pruned, dense, 0.5) == pytest.approx(math.exp(mean) - 1)
    assert increase_upper_bound(pruned, dense, 0.95) == pytest.approx(math.exp(mean + 1.6448536 * sd / 2) - 1)
    assert increase_upper_bound(pruned, dense, 0.99) > increase_upper_bound(pruned, dense, 0.9)
    for bad in (0.4, 1.0):
        with pytest.raises(UserError, match="confidence"):
            increase_upper_bound(pruned, dense, bad)


def test_window_nlls_average_to_the_perplexity(base, calib):
    import math

    from lmcompress.measure.perplexity import perplexity

    result = perplexity(base, calib[:5], progress=False, batch_size=2)
    assert len(result.window_nll) == 5
    assert math.exp(sum(result.window_nll) / 5) == pytest.approx(result.perplexity, rel=1e-5)


def test_cli_max_loss_reports_each_step_with_its_bound(tiny_folder, tmp_path, calib_text, capsys):
    import json

    from lmcompress.cli import main

    data = tmp_path / "calib.txt"
    data.write_text(calib_text[:20000])
    common = [str(tiny_folder("llama")), "--max-loss", "ppl=+5%", "--method", "wanda", "--levels", "0.1:0.7:0.1",
              "--generations", "1", "--offspring", "2", "--survivors", "1,1", "--stage-windows", "1,2",
              "--fitness-windows", "3", "--calib-data", str(data), "--nsamples", "4", "--seqlen", "32",
              "-q"]  # fmt: skip
    with pytest.raises(SystemExit) as bad:
        main(["search", *common, "--max-loss-confidence", "1.5", "-o", str(tmp_path / "bad")])
    assert bad.value.code not in (0, None) and not (tmp_path / "bad").exists()
    assert "confidence" in capsys.readouterr().err
    out = tmp_path / "within"
    with pytest.raises(SystemExit) as ok:
        main(["search", *common, "--max-loss-confidence", "0.95", "-o", str(out)])
    assert ok.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "at confidence 0.95" in printed
    steps = json.loads((out / "search.json").read_text())["bisection"]
    assert all(s["upper_bound"] >= s["increase"] - 1e-12 and s["within"] == (s["upper_bound"] <= 0.05) for s in steps)
    assert json.loads((out / "lmcompress.json").read_text())["max_loss_confidence"] == 0.95


# ------------------------------------------------------------------------------------------------------------
# bad input: each a clear error with nothing written (issue 31, section 5)

CLI_FAST = ["--method", "wanda", "--levels", "0.3:0.7:0.1", "--generations", "1", "--offspring", "2",
            "--survivors", "1,1", "--stage-windows", "1,2", "--fitness-windows", "2", "--nsamples", "4",
            "--seqlen", "32", "-q"]  # fmt: skip


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from lmcompress.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code or 0, " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(
    ("fields", "message", "param"),
    [
        ({"kind": "flops"}, "unknown budget kind", "kind"),
        ({"granularity": "row"}, "granularity", "granularity"),
        ({"fitness_windows": 4}, r"fitness_windows \(4\)", "fitness_windows"),
        ({"tune": "wanda"}, "only owl can be tuned", "tune"),
        ({"tune": "owl", "max_loss": 0.05}, "not both", "tune"),
        ({"kind": "bits", "method": "gptq", "target": 4.0, "max_loss": 0.05}, "sparsity search", "max_loss"),
        ({"max_loss": -0.1}, "positive fraction", "max_loss"),
        ({"max_loss": 0.05, "max_loss_confidence": 1.5}, "confidence", None),
        ({"trials": 0}, "trials", "trials"),
        ({"survivors": (4, 2)}, "last stage keeps 1", "stage_windows"),
        ({"kind": "bits", "method": "rtn", "target": 4.0, "group_size": 0}, "group_size", "group_size"),
        ({"levels": "0:0.9:0.0001"}, "at most 100", None),
    ],
)
def test_a_config_checks_itself_when_built_and_names_the_field(fields, message, param):
    with pytest.raises(UserError, match=message) as info:
        SearchConfig(**fields)
    assert info.value.param == param


def test_a_changed_config_is_checked_again_and_max_loss_leaves_the_target_alone():
    import dataclasses

    config = SearchConfig(target=0.5, levels="0.3:0.7:0.1")
    with pytest.raises(UserError, match="outside the levels"):
        dataclasses.replace(config, target=0.9)
    # a max-loss search chooses the sparsity itself: the target is not a budget then, so it is not checked
    within = SearchConfig(levels="0.1:0.5:0.1", max_loss=0.05)
    assert within.max_loss == 0.05 and within.validate() == parse_levels("0.1:0.5:0.1")
    assert SearchConfig().held_out == 16 and SearchConfig(stage_windows=(2, 32)).held_out == 32


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trials", "5"], "--trials does not apply without --tune owl"),
        (["--group-size", "64"], "--group-size does not apply to a sparsity budget"),
        (["--tune", "owl", "--offspring", "3"], "does not apply with --tune owl"),
        (["--max-loss", "ppl=+5%", "--budget", "sparsity=0.5"], "--budget does not apply with --max-loss"),
        (["--max-loss-confidence", "0.95"], "--max-loss-confidence does not apply without --max-loss"),
    ],
)
def test_options_the_search_would_ignore_are_refused(extra, message, tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _cli(["search", str(tiny_folder("llama")), *extra, "-o", str(out)], capsys)
    assert code == 2 and message in err, err
    assert sorted(tmp_path.iterdir()) == []  # no output, no work folder


def test_tuned_owl_is_placed_on_the_levels_given(base, calib, tmp_path):
    from lmcompress.search.tune import tune_owl

    config = SearchConfig(target=0.6, levels="0.3,0.6,0.9", **{k: v for k, v in FAST.items() if k != "levels"})
    report = tune_owl(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "t", trials=2, progress=False)
    assert report.levels == [0.3, 0.6, 0.9] and set(report.allocation) <= {0.3, 0.6, 0.9}  # --levels is used
    assert report.achieved == pytest.approx(0.6, abs=1e-9)


def _full_safetensors(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


def _full_os(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(
    ("target", "writer"),
    [
        ("lmcompress.search.database.save_file", _full_safetensors),
        ("lmcompress.search.state.write_file_atomic", _full_os),
    ],
)
def test_a_full_disk_is_a_clear_error_and_removes_the_work_folder(
    target, writer, tiny_folder, tmp_path, calib_text, capsys, monkeypatch
):
    data = tmp_path / "calib.txt"
    data.write_text(calib_text[:20000])
    monkeypatch.setattr(target, writer)
    out = tmp_path / "out"
    code, err = _cli(
        ["search", str(tiny_folder("llama")), *CLI_FAST, "--calib-data", str(data), "-o", str(out)], capsys
    )
    assert code == 2 and "the disk is full" in err and "was removed" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]  # no output, no .out.search-work


def test_a_second_search_into_the_same_output_is_refused_while_the_first_runs(tiny_folder, tmp_path, capsys):
    import os

    from lmcompress.search.work import LOCK_FILE, held_work, work_folder

    out = tmp_path / "out"
    work = work_folder(out)
    work.mkdir()
    (work / "state-x.json").write_text("{}")  # the first search's state
    holder = os.getppid()  # a live process other than this one
    (work / LOCK_FILE).write_text(f"{holder}\n")
    code, err = _cli(["search", str(tiny_folder("llama")), *CLI_FAST, "-o", str(out)], capsys)
    assert code == 2 and f"another search (process {holder})" in err, err
    assert (work / "state-x.json").is_file() and (work / LOCK_FILE).read_text().strip() == str(holder)
    assert not out.exists()
    (work / LOCK_FILE).write_text(f"{2**22 + 1}\n")  # above any pid_max: a killed search's lock
    with held_work(out, keep=True) as held:  # taken over, its state kept
        assert held == work and (work / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert (work / "state-x.json").is_file() and not (work / LOCK_FILE).exists()
    with held_work(tmp_path / "other") as held:  # nothing done: nothing left behind
        assert held.is_dir()
    assert not work_folder(tmp_path / "other").exists()


DAMAGED = [
    ('{"config": {"kind": "sparsity"}, "layer_le', "not readable JSON"),
    ('{"model.layers.0.mlp.down_proj": NaN}', "finite numbers"),
    ('{"config": {"kind": "sparsity"}, "layer_levels": {"model.layers.0.mlp.down_proj": "0.5"}}', "finite numbers"),
    ("[0.5]", "JSON object of layer name"),
    ("\udcff", "not readable JSON"),
]


def test_a_damaged_allocation_file_is_refused_by_search_and_prune(tiny_folder, tmp_path, capsys):
    import os

    src = str(tiny_folder("llama"))
    cases = [*DAMAGED, (None, "not a regular file")]
    for k, (content, message) in enumerate(cases):
        path = tmp_path / f"damaged{k}.json"
        if content is None:
            os.mkfifo(path)  # reading it would block forever
        else:
            path.write_bytes(content.encode("utf-8", "surrogateescape"))
        for verb, flag in (("search", "--start"), ("prune", "--allocation")):
            out = tmp_path / f"{verb}{k}"
            code, err = _cli([verb, src, flag, str(path), "--method", "wanda", "-q", "-o", str(out)], capsys)
            assert code == 2 and message in err, (verb, content, err)
            assert not out.exists() and not work_folder_exists(tmp_path)


def work_folder_exists(folder) -> bool:
    return any(p.name.endswith(".search-work") for p in folder.iterdir())


def test_the_one_reader_takes_search_files_output_folders_and_recipes(tmp_path):
    import json

    from lmcompress.checkpoint.allocation import read_layer_levels
    from lmcompress.search.run import read_start
    from lmcompress.transforms.prune import read_allocation

    levels = {"a.0.q": 0.5, "a.0.k": 0.7}
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "search.json").write_text(
        json.dumps({"config": {"kind": "sparsity"}, "layer_levels": levels})
    )
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "lmcompress.json").write_text(json.dumps({"kind": "prune", "layer_targets": levels}))
    recipe = {"kind": "search", "search": {"kind": "bits"}, "layer_levels": {"a.0.q": 3.0}}
    (tmp_path / "bits.json").write_text(json.dumps(recipe))
    for path in (tmp_path / "search", tmp_path / "search" / "search.json", tmp_path / "pruned"):
        assert read_allocation(path) == read_start(path, "sparsity") == levels
    assert read_layer_levels(tmp_path / "bits.json", "bits") == {"a.0.q": 3.0}
    with pytest.raises(UserError, match="holds bits levels, not sparsities") as info:
        read_allocation(tmp_path / "bits.json")
    assert info.value.param == "allocation"
    with pytest.raises(UserError, match="holds sparsity levels, not bit widths") as info:
        read_start(tmp_path / "search", "bits")
    assert info.value.param == "start"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(history=[{"generation": 1}]), "'history'"),
        (lambda r: r.update(baselines={"uniform": "low"}), "'baselines'"),
        (lambda r: r.update(units=r["units"][:-1]), "'units'"),
        (lambda r: r.update(config=None), "'config'"),
        (lambda r: r["config"].update(granularity="row"), "granularity"),
        (lambda r: r.update(fitness=None), "'fitness'"),
        (lambda r: r.update(rounds=[{"generation": "x"}]), "'rounds'"),
    ],
)
def test_report_on_a_damaged_search_json_is_a_clear_error(change, message, tmp_path, capsys):
    import json

    good = {
        "config": {"kind": "sparsity", "granularity": "block", "target": 0.5},
        "levels": [0.3, 0.5, 0.7],
        "units": [["m.layers.0.q"], ["m.layers.1.q"]],
        "allocation": [0.3, 0.7],
        "achieved": 0.5,
        "fitness": 0.1,
        "baselines": {"uniform": 0.2},
        "history": [{"generation": 1, "fitness": 0.1}],
    }
    out = tmp_path / "out"
    out.mkdir()
    damaged = copy.deepcopy(good)
    change(damaged)
    (out / "search.json").write_text(json.dumps(damaged))
    code, err = _cli(["report", str(out)], capsys)
    assert code == 2 and "is not a search result" in err and message in err, err
    assert sorted(p.name for p in out.iterdir()) == ["search.json"]  # nothing written


def test_held_out_windows_come_from_text_the_calibration_windows_never_touch(
    tiny_folder, tmp_path, capsys, calib_text, monkeypatch
):
    from lmcompress.calibration.data import draw
    from lmcompress.search import run as run_module

    text = tmp_path / "nine.txt"
    text.write_text("the cat sat on the")  # 9 tokens: 3 windows of 4 need 6 of them, 2 held-out windows 5 more
    out = tmp_path / "out"
    argv = ["search", str(tiny_folder("llama")), *CLI_FAST[:-5], "--nsamples", "3", "--seqlen", "4", "-q"]
    code, err = _cli([*argv, "--calib-data", str(text), "-o", str(out)], capsys)
    assert code == 2 and "has 9 tokens" in err and "need at least 11 tokens" in err, err
    assert "(--nsamples, --fitness-windows)" in err and "--seqlen" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nine.txt"]  # nothing written, not even a work folder

    seen = {}

    def capture(model, config, calib, held_out, work, **kwargs):
        seen.update(calib=calib, held_out=held_out)
        raise UserError("stop here")

    monkeypatch.setattr(run_module, "run_search", capture)
    data = tmp_path / "calib.txt"
    data.write_text(calib_text[:5000])
    code, err = _cli([*argv[:-5], "--nsamples", "4", "--seqlen", "16", "--calib-data", str(data), "-o", str(out)],
                     capsys)  # fmt: skip
    assert code == 2 and "stop here" in err, err
    tokenizer = _tokenizer_of(tiny_folder("llama"))
    expected, _ = draw(tokenizer, str(data), nsamples=4, seqlen=16, held_out=2)
    assert torch.equal(torch.cat([seen["calib"], seen["held_out"]]), expected) and len(seen["held_out"]) == 2
    ids = torch.tensor(tokenizer(data.read_text())["input_ids"])
    head, tail = split_stream(ids, 4, 2, 16)
    assert all(_inside(row, head) for row in seen["calib"]) and all(_inside(row, tail) for row in seen["held_out"])


def _tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _inside(row: torch.Tensor, stream: torch.Tensor) -> bool:
    return any(torch.equal(stream[s : s + len(row)], row) for s in range(len(stream) - len(row) + 1))


def test_no_work_folder_is_made_inside_the_source_or_for_a_missing_parent(tiny_folder, tmp_path, capsys):
    src = tiny_folder("llama")
    before = sorted(p.name for p in src.iterdir())
    code, err = _cli(["search", str(src), *CLI_FAST, "-o", str(src / "out")], capsys)
    assert code == 2 and "inside the source model folder" in err, err
    assert sorted(p.name for p in src.iterdir()) == before  # not even a work folder for a moment
    code, err = _cli(["search", str(src), *CLI_FAST, "-o", str(tmp_path / "no" / "out")], capsys)
    assert code == 2 and "does not exist" in err and not (tmp_path / "no").exists(), err
