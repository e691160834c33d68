"""The growth-vs-scratch benchmark's --quick mode end to end (no savings asserted: it is a smoke
test of the pipeline, on models far too small to show them)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from pathlib import Path

from conftest import REPO


def test_growth_vs_scratch_quick(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, str(REPO / "benchmarks" / "growth_vs_scratch.py"), "--quick", "--methods", "ligo,fpi",
           "--work", str(work), "--out", str(out), "--jobs", "2"]  # a horizon's runs two at a time
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # small, then scratch and 2 grown runs at each of the 2 horizons (1x and 1.5x the tokens)
    assert len(re.findall(r"^  \S+: \d+ s$", proc.stdout, re.M)) == 7
    res = json.loads((out / "growth_vs_scratch-tiny-gpt2-quick.json").read_text())
    seed = res["seeds"][0]
    rows = seed["rows"]
    assert set(rows) == {"scratch", "ligo", "fpi"}
    gvs = growth_vs_scratch()
    for h, tokens in (("1", 32_000), ("1.5", 48_000)):
        hz = seed["horizons"][h]
        assert hz["large_tokens"] == tokens and hz["rows"]["scratch"]["curve"]["flops"][-1] == hz["scratch_flops"]
        for m in ("ligo", "fpi"):  # the fit's FLOPs are in the FLOPs to target, at every horizon
            r, c = hz["rows"][m], hz["rows"][m]["curve"]
            hit = gvs.crossing(c["flops"], c["loss"], hz["target"])
            assert (hit is None) == (not r["reached"])
            if hit is not None:
                assert r["flops_to_target"] == pytest.approx(r["fit_flops"] + hit, rel=1e-12)
    assert seed["horizons"]["1.5"]["scratch_flops"] == pytest.approx(1.5 * seed["scratch_flops"], rel=0.02)
    assert (out / "growth_vs_scratch-tiny-gpt2-quick-horizons.png").stat().st_size > 10_000
    assert seed["target"] == rows["scratch"]["final_val_loss"] == rows["scratch"]["curve"]["loss"][-1]
    # FPI is function preserving: the grown model's first held-out loss is the small model's last.
    assert rows["fpi"]["loss_after_growth"] == pytest.approx(seed["small"]["final_val_loss"], abs=1e-4)
    # The LiGO fit's FLOPs are counted, and a reached target's saving follows from them.
    assert rows["ligo"]["fit_flops"] > 0 and rows["fpi"]["fit_flops"] == 0
    for m in ("ligo", "fpi"):
        r = rows[m]
        if r["reached"]:
            assert r["saving_given"] == pytest.approx(1 - r["flops_to_target"] / seed["scratch_flops"])
        else:
            assert "flops_to_target" not in r
    assert (out / "growth_vs_scratch-tiny-gpt2-quick.png").stat().st_size > 10_000
    assert "| ligo |" in (out / "growth_vs_scratch-tiny-gpt2-quick.md").read_text()
    # A second invocation reuses every finished run (nothing is trained again).
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert again.returncode == 0 and not re.search(r"^  \S+: \d+ s$", again.stdout, re.M), again.stdout
    # The same label with another option is another growth: its runs (and only they) train again.
    recipe = yaml.safe_load((REPO / "benchmarks" / "recipes" / "tiny-gpt2.yaml").read_text())
    recipe["quick"]["methods"]["fpi"] = {"noise": 0.2}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(recipe))
    third = subprocess.run(cmd + ["--recipe", str(changed)], cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ))
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert sorted(re.findall(r"^  (\S+): \d+ s$", third.stdout, re.M)) == ["fpi-lr0.0015", "h1.5x-fpi-lr0.0015"]
    # Growth timing scaled with the budget: at 1.5x the small model trains 1.5x as long; only that
    # small run and the runs grown from it are new, and end to end pays for the longer small run.
    fourth = subprocess.run(cmd + ["--recipe", str(changed), "--methods", "fpi", "--small_scales_with_horizon"],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert fourth.returncode == 0, fourth.stdout[-3000:] + fourth.stderr[-3000:]
    assert sorted(re.findall(r"^  (\S+): \d+ s$", fourth.stdout, re.M)) == ["h1.5x-small", "h1.5x-smallxh-fpi-lr0.0015"]
    res = json.loads((out / "growth_vs_scratch-tiny-gpt2-quick-smallxh.json").read_text())
    h1, h15 = res["seeds"][0]["horizons"]["1"], res["seeds"][0]["horizons"]["1.5"]
    assert h15["small"]["total_flops"] == pytest.approx(1.5 * h1["small"]["total_flops"], rel=0.05)
    fpi = h15["rows"]["fpi"]  # function preserving: starts at the longer small model's loss
    assert fpi["loss_after_growth"] == pytest.approx(h15["small"]["final_val_loss"], abs=1e-4)
    assert fpi["loss_after_growth"] < h1["rows"]["fpi"]["loss_after_growth"]
    if fpi["reached"]:
        assert fpi["saving_end_to_end"] == pytest.approx(
            1 - (h15["small"]["total_flops"] + fpi["flops_to_target"]) / h15["scratch_flops"])
    # ... and the runs grown from the shared small model are still there: nothing trains again.
    fifth = subprocess.run(cmd + ["--recipe", str(changed)], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ))
    assert fifth.returncode == 0 and not re.search(r"^  \S+: \d+ s$", fifth.stdout, re.M), fifth.stdout[-3000:]


def test_horizons_are_any_ascending_positive_multiples():
    """A study of one long horizon (--horizons 3) is allowed; unordered, repeated, empty or
    non-positive horizons are refused before any run."""
    gvs = growth_vs_scratch()
    assert gvs.check_horizons([3], "h") == [3] and gvs.check_horizons([1, 3, 9], "h") == [1, 3, 9]
    assert gvs.check_horizons([0.5, 1.5], "h") == [0.5, 1.5]
    for bad in ([], [3, 1], [1, 1], [0, 1], [-1], ["3"], [True], 3):
        with pytest.raises(SystemExit, match="ascending list of positive multiples"):
            gvs.check_horizons(bad, "h")


def test_crossing_and_interpolation_helpers():
    gvs = growth_vs_scratch()
    xs, ys = [0.0, 10.0, 20.0, 30.0], [5.0, 4.0, 3.0, 2.5]
    assert gvs.crossing(xs, ys, 3.5) == pytest.approx(15.0)   # between the 2nd and 3rd points
    assert gvs.crossing(xs, ys, 3.0) == 20.0                  # exactly on a point
    assert gvs.crossing(xs, ys, 6.0) == 0.0                   # already below at the start
    assert gvs.crossing(xs, ys, 2.0) is None                  # never reached
    assert gvs.crossing([0.0, 1.0, 2.0], [3.0, 2.0, 2.5], 2.2) == pytest.approx(0.8)  # the first crossing
    assert gvs.at(xs, ys, 25.0) == pytest.approx(2.75) and gvs.at(xs, ys, 0.0) == 5.0 and gvs.at(xs, ys, 30.0) == 2.5
    assert gvs.at(xs, ys, -1.0) is None and gvs.at(xs, ys, 31.0) is None


def test_score_row_counts_the_fit_and_the_small_model():
    """FLOPs to target = the operator fit + the grown run's FLOPs to scratch's loss; end to end adds
    the small model's training. Leaving the fit out changes every number below."""
    gvs = growth_vs_scratch()
    scratch = {"flops": [0.0, 50.0, 100.0], "loss": [8.0, 5.0, 4.0], "wall": [0.0, 5.0, 10.0],
               "final_val_loss": 4.0, "total_flops": 100.0}
    small = {"total_flops": 20.0, "wall": [0.0, 3.0]}
    grown = {"flops": [0.0, 20.0, 40.0, 120.0], "loss": [5.0, 4.5, 3.5, 3.0], "wall": [0.0, 2.0, 4.0, 6.0],
             "final_val_loss": 3.0}
    row = gvs.score_row(grown, fit_flops=6.0, grow_wall_s=1.0, small=small, scratch=scratch)
    assert row["reached"] and row["flops_to_target"] == pytest.approx(6.0 + 30.0)
    assert row["saving_given"] == pytest.approx(1 - 36.0 / 100.0)
    assert row["saving_end_to_end"] == pytest.approx(1 - (20.0 + 36.0) / 100.0)
    assert row["wall_to_target_s"] == pytest.approx(1.0 + 3.0) and row["wall_saving_given"] == pytest.approx(0.6)
    assert row["loss_at_equal_flops_given"] == pytest.approx(3.5 - 0.5 * 54.0 / 80.0)  # at 100 - 6 FLOPs
    assert row["loss_at_equal_flops_end_to_end"] == pytest.approx(3.5 - 0.5 * 34.0 / 80.0)  # at 100 - 6 - 20
    assert row["head_start_flops"] == pytest.approx(50.0)  # scratch reaches the grown start (5.0) at 50
    never = gvs.score_row(dict(grown, loss=[5.0, 4.8, 4.5, 4.2]), 6.0, 1.0, small, scratch)
    assert not never["reached"] and "saving_given" not in never
    assert gvs.score_row(dict(grown, loss=[6.5, 4.0, 3.5, 3.0]), 6.0, 1.0, small, scratch)["head_start_flops"] \
        == pytest.approx(25.0)  # between scratch's points: 8.0 at 0, 5.0 at 50


def test_per_seed_results_combine_into_one(tmp_path):
    """Seeds run side by side (--seeds) combine into one result of the recipe, seeds in order; results
    of another recipe are refused."""
    gvs = growth_vs_scratch()
    recipe = {"name": "x", "large_tokens": 100, "seeds": [11, 12]}
    part = lambda seed, tokens=100: {"name": f"x-seed{seed}", "recipe": dict(recipe, seeds=[seed], large_tokens=tokens),
                                     "seeds": [{"seed": seed}], "wall_s": 2.0, "date": "d"}
    for seed in (12, 11):
        (tmp_path / f"{seed}.json").write_text(json.dumps(part(seed)))
    res = gvs.combine([str(tmp_path / "12.json"), str(tmp_path / "11.json")], "x")
    assert [s["seed"] for s in res["seeds"]] == [11, 12] and res["recipe"]["seeds"] == [11, 12]
    assert res["name"] == "x" and res["wall_s"] == 4.0
    (tmp_path / "other.json").write_text(json.dumps(part(13, tokens=200)))
    with pytest.raises(SystemExit, match="different recipes"):
        gvs.combine([str(tmp_path / "11.json"), str(tmp_path / "other.json")], "x")


def test_growth_vs_scratch_refuses_an_unknown_method(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "growth_vs_scratch.py"), "--quick",
                           "--methods", "ligo,magic", "--work", str(tmp_path), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "magic" in proc.stderr and not any(tmp_path.iterdir())


def bench_module(name: str):
    """A benchmark script as a module (they live outside the package)."""
    import importlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def growth_vs_scratch():
    return bench_module("growth_vs_scratch")


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "benchmarks" / "recipes").glob("*.yaml")))
@pytest.mark.parametrize("quick", [False, True])
def test_every_benchmark_recipe_is_valid(tmp_path, name, quick):
    """Each shipped benchmark recipe: every run's dsgrow recipe loads and every growth request is
    one the method can carry out (what the benchmark checks before it trains anything)."""
    gvs = growth_vs_scratch()
    cfg = gvs.load_bench(str(REPO / "benchmarks" / "recipes" / f"{name}.yaml"), quick)
    gvs.validate(cfg, list(cfg["methods"]), tmp_path)
    assert not any(tmp_path.iterdir())  # the check leaves nothing behind


FAIR_RECIPES = sorted(p.stem for p in (REPO / "benchmarks" / "recipes").glob("*-fair.yaml"))


@pytest.mark.parametrize("name", FAIR_RECIPES)
def test_fair_recipes_run_every_copy_based_baseline_in_its_paper_form(name):
    """A fair comparison's recipe must not drop a baseline or run one in a weaker form than its
    paper's: every method of PAPER_FORMS is there with its paper's options (e.g. the same noise)."""
    from dsgrow.growth import PAPER_FORMS

    methods = yaml.safe_load((REPO / "benchmarks" / "recipes" / f"{name}.yaml").read_text())["methods"]
    for method, form in PAPER_FORMS.items():
        # the benchmark's rule: an entry runs its `method:`, else the method its label names
        rows = [o for label, o in methods.items() if (o or {}).get("method", label) == method
                and all((o or {}).get(k) == v for k, v in form.items())]
        assert rows, f"{name}: no {method} run in its paper form {form}"


def test_a_method_that_cannot_grow_the_pair_fails_before_training(tmp_path):
    recipe = (REPO / "benchmarks" / "recipes" / "tiny-gpt2.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.replace("hidden: 64, heads: 4, max_seq_len: 64}", "hidden: 48, heads: 3, max_seq_len: 64}"))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "growth_vs_scratch.py"), "--recipe", str(bad),
                           "--quick", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "methods.stack" not in proc.stderr
    assert "hyperclone" in proc.stderr and "integer multiples" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "seed1234").exists()


@pytest.mark.parametrize("entry, words", [({"train": {"lr": 1e-3}}, "use lrs for the LR"),
                                          ({"train": {"warmup_tokens": "lots"}}, "methods.fpi.train"),
                                          ({"lrs": []}, "methods.fpi.lrs")])
def test_a_bad_grown_run_setting_fails_before_training(tmp_path, entry, words):
    gvs = growth_vs_scratch()
    cfg = gvs.load_bench(str(REPO / "benchmarks" / "recipes" / "tiny-gpt2.yaml"), True)
    cfg["methods"]["fpi"] = entry
    with pytest.raises(SystemExit, match=words.replace(".", r"\.")):
        gvs.validate(cfg, ["fpi"], tmp_path)
    assert not any(tmp_path.iterdir())


def progressive():
    return bench_module("progressive")


PROGRESSIVE_BENCHES = sorted(str(p.relative_to(REPO / "benchmarks" / "recipes"))
                            for d in ("progressive", "est") for p in (REPO / "benchmarks" / "recipes" / d).glob("*.yaml"))


@pytest.mark.parametrize("name", PROGRESSIVE_BENCHES)
@pytest.mark.parametrize("quick", [False, True])
def test_every_progressive_benchmark_recipe_is_valid(name, quick):
    prog = progressive()
    cfg = prog.load_bench(str(REPO / "benchmarks" / "recipes" / name), quick)
    prog.check_recipes(cfg)  # every variant at every scale loads through dsgrow's recipe checks
    if quick:  # the quick variants replace the full list
        raw = yaml.safe_load((REPO / "benchmarks" / "recipes" / name).read_text())
        assert list(cfg["variants"]) == list(raw["quick"]["variants"])


def test_est_variants_are_not_scratch_baselines():
    prog = progressive()
    cfg = prog.load_bench(str(REPO / "benchmarks" / "recipes" / "est" / "tiny-gpt2.yaml"), False)
    assert [k for k, v in cfg["variants"].items() if prog.is_scratch(v)] == ["scratch"]
    r = prog.recipe_of(cfg, "growth-ligo-est", 2e-3, 7, 1.0)
    assert "subnetwork" not in r["train"] and r["stages"][1]["train"]["subnetwork"] == {"method": "est"}
    assert prog.recipe_of(cfg, "est-default", 2e-3, 7, 1.0)["train"]["subnetwork"] == {"method": "est"}


def test_progressive_stages_split_on_whole_steps():
    prog = progressive()
    cfg = prog.load_bench(str(REPO / "benchmarks" / "recipes" / "progressive" / "tiny-gpt2.yaml"), False)
    blk = prog.block_tokens(cfg)
    for scale in cfg["scales"]:
        r = prog.recipe_of(cfg, "doubling", 2e-3, 7, scale)
        toks = [s["tokens"] for s in r["stages"]]
        assert all(t % blk == 0 and t > 0 for t in toks)
        assert sum(toks) == round(cfg["tokens"] * scale / blk) * blk
        # growth points at 0.3 / 0.55 / 0.8 of the run, to the step
        ends = [sum(toks[:i + 1]) / sum(toks) for i in range(3)]
        assert ends == pytest.approx([0.3, 0.55, 0.8], abs=blk / sum(toks))
        assert [s.get("model", {}).get("layers") for s in r["stages"]] == [1, 2, 4, 8]
        assert r["train"]["lr_schedule"] == "wsd" and r["train"]["seed"] == 7 and r["train"]["tokens"] is None
    s = prog.recipe_of(cfg, "scratch-cosine", 1e-3, 7, 1.0)
    assert s["stages"] is None and s["train"]["tokens"] == cfg["tokens"] // blk * blk


def test_progressive_flops_to_target():
    f = progressive().flops_to_target
    # log-linear between the rung above the target and the first at or below it
    x, bound = f([(4e12, 4.9), (1e12, 5.3), (2e12, 5.1)], 5.0)
    assert bound == "=" and x == pytest.approx((2e12 * 4e12) ** 0.5)
    assert f([(1e12, 4.8), (2e12, 4.7)], 5.0) == (1e12, "<=")  # reached at the cheapest rung: a bound
    assert f([(1e12, 5.8), (2e12, 5.7)], 5.0) == (None, None)


def test_progressive_reuses_a_run_only_when_recipe_and_code_match(tmp_path, monkeypatch):
    prog = progressive()
    calls = []

    def fake_run(cmd, **kwargs):  # stands in for the launcher: writes a finished run
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"val_loss": 5.0, "train_loss": 5.1, "flops": 1e12,
                                                      "tokens": 10, "wall_time_s": 1.0}))
        (out / "metrics.jsonl").write_text("")
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench_module("runcache").subprocess, "run", fake_run)  # the runs progressive keys
    runner = prog.Runner(tmp_path, "ds.json", {})
    recipe = {"train": {"lr": 1e-3}}
    runner.run("a", recipe)
    runner.run("a", recipe)
    assert len(calls) == 1  # same recipe, same code: reused
    runner.run("a", {"train": {"lr": 2e-3}})
    assert len(calls) == 2  # same label, another recipe: run again
    runner.code = "another-code-version"
    runner.run("a", {"train": {"lr": 2e-3}})
    assert len(calls) == 3


@pytest.mark.parametrize("quick", [False, True])
def test_pruning_benchmark_recipes_are_valid_and_prune_only_the_grown_stage(quick):
    pr = bench_module("pruning")
    cfg = pr.load_bench(str(REPO / "benchmarks" / "recipes" / "pruning" / "tiny-gpt2.yaml"), quick)
    pr.check_recipes(cfg)  # every variant, both keep directions, through dsgrow's recipe checks
    corpus = Path("/corpus")
    scratch = pr.recipe_of(cfg, "scratch", 1e-3, 7, corpus)
    assert scratch["stages"] is None and scratch["data"]["paths"] == [str(corpus)]
    growth = pr.recipe_of(cfg, "growth", 1e-3, 7, corpus)
    assert "data" not in growth["stages"][1] and sum(s["tokens"] for s in growth["stages"]) == scratch["train"]["tokens"]
    pruned = [k for k, v in cfg["variants"].items() if (v or {}).get("prune")]
    assert pruned and all(pr.recipe_of(cfg, k, 1e-3, 7, corpus, "easy")["stages"][1]["data"]["prune"]["keep"] == "easy"
                          for k in pruned)
    if not quick:  # each score at each fraction, with random as the control
        assert {(v["prune"]["score"], v["prune"]["fraction"]) for k, v in cfg["variants"].items() if k in pruned} == \
            {(s, f) for s in ("loss", "el2n", "prototype", "random") for f in (0.8, 0.6)}


def test_pruning_benchmark_curve_helpers():
    pr = bench_module("pruning")
    pts = [(1e12, 5.6), (2e12, 5.2), (4e12, 4.9)]
    assert pr.first_crossing(pts, 5.0) == pytest.approx((2e12 * 4e12) ** 0.5 * (4e12 / 2e12) ** (1 / 6), rel=1e-9)
    assert pr.first_crossing(pts, 5.7) == 1e12 and pr.first_crossing(pts, 4.0) is None
    assert pr.loss_at(pts, 2e12) == pytest.approx(5.2) and pr.loss_at(pts, 8e12) is None
    assert pr.loss_at(pts, (1e12 * 2e12) ** 0.5) == pytest.approx(5.4)


def test_draft_benchmark_recipes_are_valid():
    """Every pair's growth run (small stage exported as the ancestor) and its independent small
    run (same data and tokens, another init) load through dsgrow's recipe checks."""
    from dsgrow.recipe import recipe_from_tree

    db = bench_module("draft_acceptance")
    for quick in (False, True):
        for name, (small, large, ts, tl, lrs, seeds) in db.pairs(quick).items():
            g = db.growth_recipe(small, large, ts, tl, lrs, seeds[0], quick)
            rg = recipe_from_tree(g)
            assert rg.stage_plan()[1].grow.export_grown and rg.stage_plan()[0].tokens == ts
            ind = db.independent_recipe(g, REPO)  # init_from is checked for a config.json only when it runs
            ind["train"]["init_from"] = None
            ri = recipe_from_tree(ind)
            assert ri.stages is None and ri.train.tokens == ts and ri.model == rg.stage_plan()[0].model


def test_cascade_benchmark_builds_the_scores_dsgrow_score_builds():
    """benchmarks/cascade.py scores each block once per model and recombines: the same scores as
    dsgrow.infer.cascade.cascade running both models, for every route share."""
    import torch

    from dsgrow.families.hf_io import build_hf_model
    from dsgrow.families.spec import ModelSpec
    from dsgrow.infer.cascade import cascade, loss_and_entropy

    cb = bench_module("cascade")
    spec = ModelSpec(family="gpt2", layers=1, hidden=32, heads=4, vocab_size=64, max_seq_len=16)
    small, large = (build_hf_model(spec, seed=s).eval() for s in (0, 1))
    blocks = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(0))
    fs, fl = (lambda ids: small(input_ids=ids).logits), (lambda ids: large(input_ids=ids).logits)
    with torch.no_grad():
        (s_loss, s_ent), (l_loss, _) = loss_and_entropy(fs, blocks), loss_and_entropy(fl, blocks)
        for share in (0.1, 0.5, 1.0):
            for rule in ("margin", "entropy"):
                ref = cascade(fs, fl, blocks, share, rule, 0.7, "hard")
                got, k = cb.cascade_scores(s_loss, s_ent, l_loss, share, rule, 0.7, seed=0)
                assert k == len(ref["routed"]) and torch.allclose(got, ref["scores"], atol=1e-6)
        got, k = cb.cascade_scores(s_loss, s_ent, l_loss, 0.25, "random", 0.7, seed=0)
        assert k == 10 and (got == l_loss).sum() >= 10
