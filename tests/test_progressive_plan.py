"""`dsgrow plan --progressive`: FLOP accounting, depth schedules, the shape rule, the written
recipe (through dsgrow's own loader and, once, the launcher), and the CLI's error paths."""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from dsgrow.schedules import progressive_cli
from dsgrow.schedules.batch import ScheduleError
from dsgrow.schedules.budget import compute_optimal
from dsgrow.schedules.flops import flops_per_token
from dsgrow.schedules.plan_cli import main
from dsgrow.schedules.progressive_plan import (DEPTH_RULES, REFUSED, SCHEDULES, check_method, depth_steps,
                                               plan_progressive)

TINY = ["--vocab", "2048", "--seq-len", "128"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("flops", [3e12, 1e17, 1e21])
def test_stages_spend_the_budget_in_whole_steps(family, schedule, flops):
    big = flops > 1e15
    plan = plan_progressive(flops, family, schedule=schedule, vocab_size=32000 if big else 2048,
                            seq_len=2048 if big else 128, global_batch=512 if big else 32)
    assert abs(plan.total_flops - flops) <= 0.005 * flops
    step = plan.global_batch * plan.seq_len
    for s in plan.stages:
        assert s.flops == s.tokens * flops_per_token(s.spec, plan.seq_len)
        assert s.tokens % step == 0 and s.tokens >= step
        assert s.spec.hidden == plan.final.spec.hidden and s.spec.heads == plan.final.spec.heads
    assert plan.stages[0].spec.layers == 1
    assert plan.grow_at_realized == pytest.approx(0.8, abs=0.01)
    assert plan.scratch_tokens == int(flops // plan.final.flops_per_token)


def test_final_shape_follows_the_rule():
    n_opt = compute_optimal(1e21)[0]
    gpt = plan_progressive(1e21, "gpt2", vocab_size=50257, seq_len=2048, global_batch=512).final
    assert abs(math.log(gpt.params / n_opt)) < math.log(1.1)  # counted with embeddings, as the fit does
    assert gpt.spec.head_dim == 64 and 48 <= gpt.spec.hidden / gpt.spec.layers <= 80
    llama = plan_progressive(1e21, "llama", vocab_size=32000, seq_len=2048, global_batch=512).final.spec
    assert llama.head_dim == 64 and llama.kv_heads == llama.heads // 4 and 96 <= llama.hidden / llama.layers <= 160
    tiny = plan_progressive(3e12, "gpt2").final.spec
    assert (tiny.layers, tiny.hidden, tiny.heads) == (4, 32, 2)  # embeddings take most of 119K params
    fixed = plan_progressive(3e12, "llama", layers=6, hidden=64, heads=2).final.spec
    assert (fixed.layers, fixed.hidden, fixed.heads) == (6, 64, 2)


def test_doubling_depths_and_token_split():
    assert depth_steps(1, 12, "doubling") == [1, 2, 4, 8, 12]
    assert depth_steps(1, 8, "doubling") == [1, 2, 4, 8]
    assert depth_steps(2, 12, "single") == [2, 12]
    plan = plan_progressive(1e15, "gpt2", schedule="doubling", layers=16, hidden=64)
    assert [s.spec.layers for s in plan.stages] == [1, 2, 4, 8, 16]
    early = [s.tokens for s in plan.stages[:-1]]
    assert max(early) - min(early) <= plan.global_batch * plan.seq_len  # split evenly, to a step
    assert sum(early) / plan.total_tokens == pytest.approx(0.8, abs=0.002)
    # stack needs integer multiples: the shape rule only picks depths doubling reaches
    auto = plan_progressive(1e21, "gpt2", schedule="doubling", method="stack", vocab_size=50257, seq_len=2048,
                            global_batch=512)
    assert [s.spec.layers for s in auto.stages] == [1, 2, 4, 8, 16, 32]
    interp = plan_progressive(1e15, "gpt2", schedule="doubling", method="interpolate", layers=12, hidden=64)
    assert [s.spec.layers for s in interp.stages] == [1, 2, 4, 8, 12]


def test_depth_rules_match_the_growth_registry():
    from dsgrow.families.spec import ModelSpec
    from dsgrow.growth import REGISTRY, GrowthError, check_request

    assert set(DEPTH_RULES) | set(REFUSED) == set(REGISTRY) and not set(DEPTH_RULES) & set(REFUSED)
    for method, rule in DEPTH_RULES.items():
        for a, b in [(1, 12), (2, 4), (8, 12), (4, 6)]:
            specs = [ModelSpec(family="llama", layers=d, hidden=512, heads=8, kv_heads=2, vocab_size=256)
                     for d in (a, b)]
            try:
                check_request(*specs, method)
                registry_ok = True
            except GrowthError:
                registry_ok = False
            assert registry_ok == (rule == "any" or b % a == 0), (method, a, b)
            try:
                check_method(method, [a, b])
                assert registry_ok, (method, a, b)
            except ScheduleError:
                assert not registry_ok, (method, a, b)
    # the parser's literal copies (kept so that building it imports neither module)
    from dsgrow.families.spec import FAMILIES
    from dsgrow.schedules.progressive_plan import DEFAULT_GROW_AT

    assert progressive_cli.SCHEDULES == SCHEDULES and progressive_cli.FAMILIES == FAMILIES
    assert progressive_cli.DEFAULT_GROW_AT == DEFAULT_GROW_AT


@pytest.mark.parametrize("family,extra", [("gpt2", ["--schedule", "doubling"]),
                                          ("llama", ["--layers", "4", "--hidden", "512", "--method", "fpi"]),
                                          ("bert", ["--data-paths", "a.txt", "b.txt"])])
def test_written_recipe_loads_with_the_planned_stages(tmp_path, capsys, family, extra):
    from dsgrow.recipe import load_recipe

    path = tmp_path / "r.yaml"
    argv = ["--flops", "1e15" if family == "llama" else "3e12", "--progressive", "--family", family, *TINY, *extra]
    assert main([*argv, "--write", str(path), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    text = path.read_text()
    assert text.startswith("# ") and f"--recipe {path}" in text
    tree = yaml.safe_load(text)
    assert tree == planned["recipe"]
    recipe = load_recipe(str(path))
    stages = recipe.stage_plan()
    assert [(s.model.layers, s.model.hidden, s.model.heads, s.model.n_kv_heads, s.tokens) for s in stages] == \
        [(p["layers"], p["hidden"], p["heads"], p["kv_heads"], p["tokens"]) for p in planned["plan"]["stages"]]
    assert all(s.model.family == family and s.model.max_seq_len == 128 for s in stages)
    assert [s.grow.method for s in stages[1:]] == [tree["stages"][1]["grow"]["method"]] * (len(stages) - 1)
    assert recipe.train.tokens == sum(s.tokens for s in stages) == planned["plan"]["total_tokens"]
    assert recipe.train.lr_schedule == "wsd" and recipe.train.decay_fraction == 0.2
    assert recipe.data.vocab_size == 2048
    if family == "bert":
        assert recipe.data.source == "files" and recipe.data.paths == ["a.txt", "b.txt"]
    if family == "llama":
        assert stages[0].model.kv_heads == 2 and stages[-1].grow.method == "fpi"


@pytest.mark.parametrize("argv,needle", [
    (["--flops", "3e12", "--schedule", "doubling"], "--schedule applies only with --progressive"),
    (["--flops", "3e12", "--layers", "4", "--write", "X"], "--layers, --write apply only with --progressive"),
    (["--flops", "3e12", "--progressive", "--grow-at", "1"], "--grow-at must be in (0, 1)"),
    (["--flops", "3e12", "--progressive", "--grow-at", "0"], "--grow-at must be in (0, 1)"),
    (["--flops", "3e12", "--progressive", "--start-layers", "4", "--layers", "4", "--hidden", "32"], "--start-layers"),
    (["--flops", "3e12", "--progressive", "--start-layers", "0"], "--start-layers must be a positive integer"),
    (["--flops", "3e12", "--progressive", "--family", "t5"], "invalid choice"),
    (["--flops", "3e12", "--progressive", "--method", "warp"], "unknown growth method 'warp'"),
    (["--flops", "3e12", "--progressive", "--method", "random"], "thrown away"),
    (["--flops", "3e12", "--progressive", "--method", "ligo"], "does not budget"),
    (["--flops", "3e12", "--progressive", "--schedule", "doubling", "--method", "stack", "--layers", "12",
      "--hidden", "32"], "8 -> 12 layers"),
    (["--flops", "3e12", "--progressive", "--layers", "4"], "--layers and --hidden"),
    (["--flops", "3e12", "--progressive", "--transfer", "0.5"], "--transfer"),
    (["--flops", "1e9", "--progressive"], "too small"),
    (["--flops", "1.5e10", "--progressive"], "whole optimizer steps within 0.5%"),
    (["--flops", "1e14", "--progressive", "--grow-at", "0.99999"], "stage 1 would get 0.082 optimizer steps"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, needle):
    path = tmp_path / "r.yaml"
    if "X" in argv:
        argv = [str(path) if a == "X" else a for a in argv]
    else:
        argv = [*argv, "--write", str(path)] if "--progressive" in argv else argv
    assert main(argv) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert captured.out == "" and len(errors) == 1 and errors[0].startswith("dsgrow plan: error: "), captured.err
    assert needle in errors[0]
    assert not path.exists()


def test_existing_file_is_kept_unless_forced(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("mine\n")
    argv = ["--flops", "3e12", "--progressive", "--write", str(path)]
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err and path.read_text() == "mine\n"
    assert main([*argv, "--force"]) == 0
    assert "recipe written to" in capsys.readouterr().out
    assert yaml.safe_load(path.read_text())["stages"][1]["grow"] == {"method": "fpi"}  # the default


def test_header_command_reproduces_the_recipe(tmp_path, capsys):
    first, again = tmp_path / "a.yaml", tmp_path / "b.yaml"
    argv = ["--flops", "1e15", "--progressive", "--family", "llama", "--layers", "4", "--hidden", "512",
            "--start-layers", "2", "--schedule", "doubling", "--method", "interpolate", "--lr", "1e-3"]
    assert main([*argv, "--write", str(first)]) == 0
    command = shlex.split(first.read_text().splitlines()[1].lstrip("# "))
    assert command[:2] == ["dsgrow", "plan"] and command[-2] == "--write"
    assert main([*command[2:-1], str(again)]) == 0
    capsys.readouterr()
    assert yaml.safe_load(first.read_text()) == yaml.safe_load(again.read_text())


def test_text_and_json_output(capsys):
    assert main(["--flops", "3e12", "--progressive", *TINY]) == 0
    out = capsys.readouterr().out
    for piece in ("final model: gpt2 4 layers x 32 hidden", "single (1 -> 4 layers)", "scratch run", "tok/param",
                  "--write FILE"):
        assert piece in out, piece
    assert main(["--flops", "3e12", "--progressive", "--schedule", "doubling", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in d["plan"]["stages"]] == [1, 2, 4]
    assert sum(s["flops_share"] for s in d["plan"]["stages"]) == pytest.approx(1.0)
    assert d["recipe"]["train"]["tokens"] == d["plan"]["total_tokens"] and d["written"] is None
    assert d["recipe"]["train"]["decay_fraction"] == 0.2
    assert main(["--flops", "3e12", "--progressive", "--grow-at", "0.9", "--json"]) == 0
    late = json.loads(capsys.readouterr().out)
    assert late["recipe"]["train"]["decay_fraction"] == 0.1  # the LR stays flat through the growth


def test_plan_without_progressive_stays_torch_free():
    code = ("import sys; from dsgrow.schedules.plan_cli import main; assert main(['--flops', '1e21']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_planned_recipe_runs_through_the_launcher(tmp_path, capsys):
    """A tiny budget end to end: the run's own FLOPs meter spends what the plan says, the model
    grows 1 -> 2 layers where planned, and the WSD LR is one schedule over the run: flat up to the
    growth, not restarted by it, decayed at the end."""
    from dsgrow.launch import main as launch

    path, out = tmp_path / "r.yaml", tmp_path / "run"
    argv = ["--flops", "3e10", "--progressive", "--vocab", "512", "--seq-len", "64", "--global-batch", "8",
            "--micro-batch", "8", "--layers", "2", "--hidden", "32", "--write", str(path), "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    overrides = ["train.eval_every=0", "train.checkpoint_every=0", "train.eval_samples=8", "export_hf=false"]
    assert launch(["--recipe", str(path), "--out", str(out), *[a for o in overrides for a in ("--set", o)]]) == 0
    # Run from Python, the launcher leaves no process group and no MASTER_PORT for later processes.
    import torch.distributed as dist

    assert not dist.is_initialized() and "MASTER_PORT" not in os.environ and "WORLD_SIZE" not in os.environ
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == plan["total_tokens"] and summary["stages"] == 2
    assert summary["flops"] == pytest.approx(plan["total_flops"], rel=1e-9)
    growth = summary["growth_events"][0]
    assert growth["method"] == "fpi" and growth["tokens"] == plan["stages"][0]["tokens"]
    logged = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in m]
    stable = [m["lr"] for m in logged if m["stage"] == 0 and m["tokens"] > 0.1 * plan["total_tokens"]]
    assert stable and all(lr == pytest.approx(2e-3) for lr in stable)
    after = [m["lr"] for m in logged if m["stage"] == 1]
    assert 1e-3 < after[0] < 2e-3  # 1-sqrt decay from 80% of the run on, not a re-warmup from 0
    assert after[-1] == pytest.approx(2e-4)  # min_lr_ratio x peak at the end
