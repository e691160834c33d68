"""Adam moments across a function-preserving growth (`grow.optimizer: transfer`).

The map is checked against real gradients (the large model's gradient at the grown point is the
moment map applied to the small model's gradient), then in a live run with 2 ranks under ZeRO-1,
2 and 3: the new engine's moments equal the map applied to the old engine's, and the step count
carries over.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import REPO, run_launcher
from test_sharded_growth import SMALL, staged
from test_train import final_weights, metrics, zero3_config

from dsgrow.families import ModelSpec, build_hf_model, from_canonical, load_hf_dir, to_canonical
from dsgrow.growth import grow, resolve_target
from dsgrow.growth.depth import identity_plan
from dsgrow.growth.moments import transfer_moments
from dsgrow.growth.ops import RESIDUAL_WRITERS


def _grads(model, x) -> dict:
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,small,target,method", [
    ("gpt2", {"layers": 2, "hidden": 32, "heads": 4}, {"layers": 4, "hidden": 64, "heads": 8}, "hyperclone"),
    ("gpt2", {"layers": 2, "hidden": 32, "heads": 4}, {"layers": 3, "hidden": 64, "heads": 8, "ffn": 192}, "fpi"),
    ("llama", {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2},
     {"layers": 4, "hidden": 64, "heads": 8, "kv_heads": 4}, "fpi"),
])
def test_moment_map_is_the_gradient_map(family, small, target, method):
    torch.manual_seed(0)
    spec = ModelSpec(family=family, vocab_size=50, max_seq_len=16, **small)
    model = build_hf_model(spec)
    with torch.no_grad():  # away from the init, so no coordinate is special
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    large = resolve_target(spec, target)
    big = grow(model, large, method).train()
    x = torch.randint(0, 50, (4, 16))
    g_small = to_canonical(spec, _grads(model.train(), x))
    g_large = to_canonical(large, _grads(big, x))
    moved = transfer_moments(spec, large, method, {}, g_small, {k: v.square() for k, v in g_small.items()})
    new = identity_plan(spec.layers, large.layers, post_ln=False).identity
    scale = max(g.abs().max().item() for g in g_large.values())
    checked = 0
    for k, g in g_large.items():
        layer_new = k.startswith("layers.") and new[int(k.split(".")[1])]
        if layer_new and k.split(".", 2)[2] in RESIDUAL_WRITERS:
            # A new layer's residual writers do get a gradient, but have no history: zero moments.
            assert moved["exp_avg"][k].abs().max() == 0 and moved["exp_avg_sq"][k].abs().max() == 0
            continue
        if layer_new:  # everything behind a zero writer gets exactly no gradient
            assert g.abs().max() == 0, k
        torch.testing.assert_close(moved["exp_avg"][k], g, rtol=0, atol=2e-5 * scale, msg=k)
        torch.testing.assert_close(moved["exp_avg_sq"][k], g.square(), rtol=0, atol=2e-5 * scale ** 2, msg=k)
        checked += 1
    assert checked > 20


def _adam(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, int(f.metadata()["step"])


def _ds_config(tmp_path, stage: int) -> str:
    if stage == 3:
        return zero3_config(tmp_path)
    if stage == 0:  # no ZeRO: the torch optimizer's own state, keyed by the module's parameters
        cfg = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
        cfg["zero_optimization"] = {"stage": 0}
        (tmp_path / "zero0.json").write_text(json.dumps(cfg))
        return str(tmp_path / "zero0.json")
    return f"ds_configs/zero{stage}.json"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_transfer_under_zero_equals_the_one_process_map(tmp_path, stage):
    out = tmp_path / "run"
    ds = _ds_config(tmp_path, stage)
    run_launcher(["--ds_config", ds, "--out", str(out), *staged("hyperclone", 0, extra=", optimizer: transfer")],
                 nproc=2)
    stages = out / "stages"
    small_adam, small_step = _adam(stages / "stage0-final-adam.safetensors")
    grown_adam, grown_step = _adam(stages / "stage1-grown-adam.safetensors")
    spec_s, _ = load_hf_dir(stages / "stage0-final")
    spec_l = resolve_target(spec_s, {"layers": 4, "hidden": 128})
    split = {k: {n[len(k) + 1:]: t for n, t in small_adam.items() if n.startswith(k + ".")}
             for k in ("exp_avg", "exp_avg_sq")}
    ref = transfer_moments(spec_s, spec_l, "hyperclone", {}, to_canonical(spec_s, split["exp_avg"]),
                           to_canonical(spec_s, split["exp_avg_sq"]))
    assert grown_step == small_step == 8  # 8192 tokens / (16 x 64) per step; Adam's clock carries over
    for key in ("exp_avg", "exp_avg_sq"):
        want = from_canonical(spec_l, ref[key])
        got = {n[len(key) + 1:]: t for n, t in grown_adam.items() if n.startswith(key + ".")}
        assert set(got) <= set(want) and len(got) > 30
        for n, t in got.items():
            assert torch.equal(t, want[n]), (key, n, (t - want[n]).abs().max())
        assert sum(t.abs().sum() for t in got.values()) > 0
    ev = [m for m in metrics(out) if m.get("event") == "growth"][0]
    assert ev["adam_step"] == 8 and ev["moments_written"] > 0 and "optimizer_s" in ev
    assert ev["loss_after"] == pytest.approx(ev["loss_before"], abs=1e-4)  # still the small model's function
    after = [m["val_loss"] for m in metrics(out) if "val_loss" in m and m["step"] > ev["step"]]
    assert after[-1] < ev["loss_after"] - 0.05, (ev, after)  # and training goes on from there


@pytest.mark.parametrize("grow,needle", [
    ("{method: ligo, optimizer: transfer}", "ligo does not preserve the function"),
    ("{method: stack, optimizer: transfer}", "stack does not preserve the function"),
    ("{method: fpi, depth: stack, optimizer: transfer}", "depth: identity"),
    ("{method: fpi, optimizer: keep}", "grow.optimizer must be one of reset, transfer"),
])
def test_bad_transfer_requests_fail_at_load(grow, needle):
    from dsgrow.config import ConfigError
    from dsgrow.recipe import load_recipe

    stages = f"[{{model: {SMALL}, tokens: 8K}}, {{grow: {grow}, model: {{layers: 4}}, tokens: 8K}}]"
    with pytest.raises(ConfigError) as e:
        load_recipe(None, ["train.tokens=null", "train.global_batch=16", "train.micro_batch=4", f"stages={stages}"])
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bert_transfer_is_refused_at_load():
    from dsgrow.config import ConfigError
    from dsgrow.recipe import load_recipe

    small = "{family: bert, layers: 2, hidden: 64, heads: 4}"
    stages = f"[{{model: {small}, tokens: 8K}}, {{grow: {{method: fpi, optimizer: transfer}}, model: {{layers: 4}}, tokens: 8K}}]"
    with pytest.raises(ConfigError, match="pre-LN families"):
        load_recipe(None, ["train.tokens=null", "train.global_batch=16", "train.micro_batch=4", f"stages={stages}"])


def test_transfer_with_a_ds_config_optimizer_is_refused_before_training(tmp_path):
    proc = run_launcher(["--ds_config", "ds_configs/zero3_offload.json", "--out", str(tmp_path / "run"),
                         *staged("fpi", 0, extra=", optimizer: transfer")], check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("dsgrow: error: stages[1].grow.optimizer: transfer") and "names its own optimizer" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_after_a_transfer_reaches_the_same_weights(tmp_path):
    """Killed after the growth (its moments then live only in the checkpoint), resumed: bitwise
    the uninterrupted run's final weights (one CPU rank, fp32)."""
    args = ["--ds_config", "ds_configs/zero2.json",
            *staged("hyperclone", 0, 8192, 16384, ", optimizer: transfer", "train.checkpoint_every=4096")]
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_launcher([*args, "--out", str(ref)])
    killed = run_launcher([*args, "--out", str(out)], env={"DSGROW_FAULT": "checkpoint_after_commit:step16"},
                          check=False)
    assert killed.returncode == -9, killed.stdout[-2000:]
    run_launcher([*args, "--out", str(out), "--resume"])
    a, b = final_weights(ref), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
