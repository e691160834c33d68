"""Progressive training: a run through several growth stages under one warmup-stable-decay
schedule (train.lr_schedule: wsd, train.lr_after_growth)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_launcher
from dsgrow.config import ConfigError, TrainConfig
from dsgrow.recipe import load_recipe
from dsgrow.run.schedule import StageSchedule
from dsgrow.schedules.lr import lr_schedule, warmup_stable_decay


def test_wsd_shape_values():
    f = lambda t, shape: warmup_stable_decay(t, 1000, 2.0, 100, 400, 0.1, shape)  # noqa: E731
    for shape in ("linear", "1-sqrt", "cosine"):
        assert f(50, shape) == pytest.approx(1.0)          # warmup
        assert f(100, shape) == f(600, shape) == 2.0        # stable up to the decay start
        assert f(1000, shape) == f(5000, shape) == pytest.approx(0.2)  # the floor, then flat
        assert 0.2 < f(800, shape) < 2.0
    assert f(800, "linear") == pytest.approx(0.2 + 1.8 * 0.5)
    assert f(800, "1-sqrt") == pytest.approx(0.2 + 1.8 * (1 - math.sqrt(0.5)))
    assert f(700, "cosine") == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    # decay 0: constant after warmup; the factory checks its arguments before any step
    assert warmup_stable_decay(999, 1000, 1.0, 0, 0) == 1.0
    with pytest.raises(ValueError, match="shape"):
        lr_schedule("wsd", 1000, 1.0, decay_shape="exp")
    with pytest.raises(ValueError, match="decay_fraction"):
        lr_schedule("wsd", 1000, 1.0, decay_fraction=1.5)
    assert lr_schedule("wsd", 1000, 1.0, 100, min_lr_ratio=0.0, decay_fraction=0.5, decay_shape="linear")(750) == 0.5


@pytest.mark.parametrize("override, needle", [
    ("train.lr_schedule=wsdd", "train.lr_schedule"),
    ("train.decay_fraction=1.5", "train.decay_fraction"),
    ("train.decay_shape=exp", "train.decay_shape"),
    ("train.lr_after_growth=keep", "train.lr_after_growth"),
])
def test_bad_wsd_options_fail_at_load(override, needle):
    with pytest.raises(ConfigError) as e:
        load_recipe(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def _sched(mode: str, stage_tokens: int, grown: bool) -> StageSchedule:
    t = TrainConfig(tokens=stage_tokens, seq_len=10, micro_batch=1, global_batch=1, lr=1.0, lr_schedule="wsd",
                    min_lr_ratio=0.0, decay_fraction=0.25, decay_shape="linear", warmup_tokens=100,
                    lr_after_growth=mode)
    return StageSchedule(t, run_total=2000, run_warmup=100, grown=grown)


def test_lr_after_growth_modes():
    # The second stage of a 2000-token run: 1000 tokens in, its own 1000 tokens, warmup 100 each.
    cont, rewarm, restart = (_sched(m, 1000, True) for m in ("continue", "rewarm", "restart"))
    # continue: the run's one schedule, stable across the growth, decaying over the run's last 500
    assert cont.lr_for_step(0, 1, run_tokens=1000) == 1.0
    assert cont.lr_for_step(740, 1, run_tokens=1740) == pytest.approx(0.5)
    # rewarm: the same schedule ramped from 0 over the stage's warmup after the growth
    assert rewarm.lr_for_step(40, 1, run_tokens=1040) == pytest.approx(0.5)
    assert rewarm.lr_for_step(740, 1, run_tokens=1740) == pytest.approx(0.5)
    # restart: the stage's own schedule over its own 1000 tokens (decay over its last 250)
    assert restart.lr_for_step(40, 1, run_tokens=1040) == pytest.approx(0.5)
    assert restart.lr_for_step(865, 1, run_tokens=1865) == pytest.approx(0.5)
    # the first stage never rewarms; defaults: wsd continues, cosine restarts
    assert _sched("rewarm", 1000, False).lr_for_step(40, 1, run_tokens=40) == pytest.approx(0.5)
    assert TrainConfig(lr_schedule="wsd").after_growth() == "continue"
    assert TrainConfig().after_growth() == "restart"


BLOCK = 16 * 64  # tokens per optimizer step below


def progressive_args(out: Path) -> list[str]:
    """A one-layer GPT-2 grown to 2 then 4 layers (stacking), one WSD schedule over 30 steps."""
    sets = ["train.tokens=null", "model.layers=1", "model.hidden=64", "model.heads=4", "model.max_seq_len=64",
            "data.vocab_size=512", "train.seq_len=64", "train.micro_batch=8", "train.global_batch=16",
            "train.lr=3e-3", "train.eval_samples=32", "train.log_every=1", "train.lr_schedule=wsd",
            "train.decay_shape=linear", "train.decay_fraction=0.3", f"train.warmup_tokens={4 * BLOCK}",
            f"train.eval_every={5 * BLOCK}", f"train.checkpoint_every={8 * BLOCK}",
            f"stages=[{{tokens: {10 * BLOCK}}}, {{grow: {{method: stack}}, model: {{layers: 2}}, tokens: {10 * BLOCK}}},"
            f" {{grow: {{method: stack}}, model: {{layers: 4}}, tokens: {10 * BLOCK}}}]"]
    return ["--out", str(out), *[a for s in sets for a in ("--set", s)]]


def test_three_stages_one_wsd_schedule_resumed_mid_stage(tmp_path):
    out = tmp_path / "prog"
    killed = run_launcher(progressive_args(out), env={"DSGROW_FAULT": "step:step21"}, check=False)
    assert killed.returncode != 0 and not (out / "summary.json").exists()
    run_launcher([*progressive_args(out), "--resume"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "lr" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))  # each step once across the kill
    assert [r["stage"] for r in steps] == [0] * 10 + [1] * 10 + [2] * 10
    # Every step's LR is one WSD schedule of the run's tokens (evaluated at the step's end), the
    # resumed segment included: stable through both growths, decaying over the last 9 steps only.
    want = lr_schedule("wsd", 30 * BLOCK, 3e-3, 4 * BLOCK, min_lr_ratio=0.1, decay_fraction=0.3,
                       decay_shape="linear")
    for r in steps:
        assert r["lr"] == pytest.approx(want(r["tokens"]), rel=1e-9), r
    assert steps[9]["lr"] == steps[10]["lr"] == steps[19]["lr"] == steps[20]["lr"] == 3e-3
    assert steps[-1]["lr"] == pytest.approx(3e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert [(e["stage"], e["method"], e["step"]) for e in summary["growth_events"]] == [(1, "stack", 10), (2, "stack", 20)]
    assert json.loads((out / "final_model" / "config.json").read_text())["n_layer"] == 4
    vals = [r["val_loss"] for r in rows if "val_loss" in r and "loss_after" not in r]
    assert vals[-1] < vals[0] - 0.3
