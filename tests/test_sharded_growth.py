"""Growth at a stage boundary of a live DeepSpeed run: 2 real ranks, ZeRO-1/2/3, resume across it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_launcher
from test_train import final_weights, metrics, tiny, zero3_config

SMALL = "{layers: 2, hidden: 64, heads: 4}"


def staged(method: str = "ligo", fit_steps: int = 3, s0: int = 8192, s1: int = 16384, extra: str = "",
           *more: str) -> list[str]:
    grow = f"{{method: {method}, fit_steps: {fit_steps}, export_grown: true{extra}}}"
    stages = f"[{{model: {SMALL}, tokens: {s0}}}, {{grow: {grow}, model: {{layers: 4, hidden: 128}}, tokens: {s1}}}]"
    return tiny(s0 + s1, "train.tokens=null", f"stages={stages}", *more)


def one_process_build(out, method: str, **opts):
    """What the same operator (with `opts`) makes of the same small weights in this one process."""
    from dsgrow.families import from_canonical, load_hf_dir
    from dsgrow.growth import LiGO, grow_canonical, resolve_target

    spec_s, small = load_hf_dir(out / "stages" / "stage0-final")
    spec_l = resolve_target(spec_s, {"layers": 4, "hidden": 128})
    if method == "ligo":
        op = LiGO(spec_s, small, spec_l, **opts)
        op.load_state_dict(load_file(str(out / "stages" / "stage1-ligo.safetensors")))
        with torch.no_grad():
            large = op.materialize()
    else:
        large = grow_canonical(spec_s, small, spec_l, method)
    return from_canonical(spec_l, large)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sharded_growth_equals_one_process_build_and_trains_on(tmp_path, stage):
    out = tmp_path / "run"
    ds = zero3_config(tmp_path) if stage == 3 else f"ds_configs/zero{stage}.json"
    run_launcher(["--ds_config", ds, "--out", str(out), *staged()], nproc=2)
    grown = load_file(str(out / "stages" / "stage1-grown" / "model.safetensors"))
    ref = one_process_build(out, "ligo")
    assert set(grown) <= set(ref)
    worst = max((grown[k] - ref[k]).abs().max().item() for k in grown)
    # Same operator, same small weights; only the thread count of the matmuls differs.
    assert worst <= 1e-6, worst
    ev = [m for m in metrics(out) if m.get("event") == "growth"]
    assert len(ev) == 1 and ev[0]["fit_tokens"] == 3 * 16 * 64 and ev[0]["fit_flops"] > 0
    assert ev[0]["bytes_gathered"] > 0 and ev[0]["elements_written"] > 0
    # Per rank: the base, each phase's peak, and the library code resident then (never above RSS).
    mem = ev[0]["memory_mib"]
    assert len(ev[0]["host_base_mib"]) == len(ev[0]["host_base_file_mib"]) == 2
    assert all(0 < f < p for f, p in zip(mem["write"]["host_file_end"], mem["write"]["host_peak"]))
    after = [m["val_loss"] for m in metrics(out) if "val_loss" in m and m["step"] > ev[0]["step"]]
    assert after[-1] < ev[0]["loss_after"] - 0.05, (ev[0], after)  # training goes on and the loss falls
    s = json.loads((out / "summary.json").read_text())
    assert s["tokens"] <= 8192 + 16384 and s["flops"] > 0
    if stage == 3:
        assert 0.4 < s["local_param_fraction"] < 0.6  # the large model is really partitioned
    # The small model's final checkpoint is kept for good.
    assert (out / "checkpoints" / "stage0-end" / "run_state.json").is_file()


def test_sharded_copy_init_ligo_writes_its_symmetry_noise_under_zero3(tmp_path):
    """LiGO over FPI's copies with `symmetry_noise`, fitted and written by 2 ranks into a ZeRO-3
    engine: every rank makes the same noise, so the shards hold what one process makes, and the
    noise is really there (the fitted map without it differs)."""
    out = tmp_path / "run"
    run_launcher(["--ds_config", zero3_config(tmp_path), "--out", str(out),
                  *staged("ligo", 3, 8192, 16384, ", init: fpi, symmetry_noise: 0.2")], nproc=2)
    grown = load_file(str(out / "stages" / "stage1-grown" / "model.safetensors"))
    ref = one_process_build(out, "ligo", init="fpi", symmetry_noise=0.2)
    plain = one_process_build(out, "ligo", init="fpi")
    assert max((grown[k] - ref[k]).abs().max().item() for k in grown) <= 1e-6
    assert max((grown[k] - plain[k]).abs().max().item() for k in grown) > 1e-3


def test_function_preserving_growth_keeps_the_loss_across_the_boundary(tmp_path):
    out = tmp_path / "run"
    run_launcher(["--ds_config", zero3_config(tmp_path), "--out", str(out), *staged("hyperclone", 0)], nproc=2)
    grown = load_file(str(out / "stages" / "stage1-grown" / "model.safetensors"))
    ref = one_process_build(out, "hyperclone")
    assert all(torch.equal(grown[k], ref[k]) for k in grown)
    ev = [m for m in metrics(out) if m.get("event") == "growth"][0]
    assert ev["loss_after"] == pytest.approx(ev["loss_before"], abs=1e-4)


RESUME_ARGS = ["--ds_config", "ds_configs/zero2.json", *staged("ligo", 3, 8192, 16384, "", "train.checkpoint_every=4096")]


@pytest.fixture(scope="module")
def resume_reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("resume") / "ref"
    run_launcher([*RESUME_ARGS, "--out", str(ref)])
    return ref


@pytest.mark.parametrize("fault", ["checkpoint_after_commit:stage0-end", "growth_fitted:stage1",
                                   "checkpoint_after_commit:step16"])
def test_resume_before_during_and_after_growth(tmp_path, fault, resume_reference):
    args, ref, out = RESUME_ARGS, resume_reference, tmp_path / "run"
    killed = run_launcher([*args, "--out", str(out)], env={"DSGROW_FAULT": fault}, check=False)
    assert killed.returncode == -9, killed.stdout[-2000:]
    run_launcher([*args, "--out", str(out), "--resume"])
    a, b = final_weights(ref), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: one CPU rank, fp32


@pytest.mark.parametrize("stages,needle", [
    (f"[{{model: {SMALL}, tokens: 8K}}, {{grow: {{method: fpi}}, model: {{layers: 1}}, tokens: 8K}}]", "stages[1].grow"),
    (f"[{{model: {SMALL}, tokens: 8K}}, {{grow: {{method: magic}}, model: {{layers: 4}}, tokens: 8K}}]", "magic"),
    (f"[{{model: {SMALL}, tokens: 8K}}, {{grow: {{method: fpi}}, model: {{layers: 4}}}}]", "stages[1].tokens"),
    (f"[{{model: {SMALL}, tokens: 8K}}, {{model: {{layers: 4}}, tokens: 8K}}]", "stages[1].grow"),
    (f"[{{model: {SMALL}, tokens: 8K, grow: {{method: fpi}}}}]", "stages[0].grow"),
    (f"[{{model: {SMALL}, tokens: 8K}}, {{grow: {{method: ligo, optimizer: transfer}}, model: {{layers: 4}}, tokens: 8K}}]",
     "optimizer"),
    (f"[{{model: {SMALL}, tokens: 8K}}, {{grow: {{method: ligo, fit_steps: 100}}, model: {{layers: 4}}, tokens: 8K}}]",
     "fit takes"),
    (f"[{{model: {SMALL}, tokens: 8K}}, {{grow: {{method: fpi}}, model: {{family: llama, layers: 4}}, tokens: 8K}}]",
     "family"),
    (f"[{{model: {SMALL}, tokens: 8K, train: {{seq_len: 32}}}}]", "seq_len"),
    (f"[{{model: {SMALL}, tokens: 8K}}, {{grow: {{method: ligo, depth_init: stack}}, model: {{layers: 4}}, tokens: 8K}}]",
     "depth_init"),
])
def test_bad_stages_fail_at_load(stages, needle):
    from dsgrow.config import ConfigError
    from dsgrow.recipe import load_recipe

    with pytest.raises(ConfigError) as e:
        load_recipe(None, ["train.tokens=null", "train.global_batch=16", "train.micro_batch=4",
                           f"stages={stages}"])
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_stage_with_no_growth_method_for_the_family_is_refused_at_start(tmp_path):
    # hyperclone grows width by integer multiples only: 64 -> 96 is refused before any training.
    stages = f"[{{model: {SMALL}, tokens: 8K}}, {{grow: {{method: hyperclone}}, model: {{hidden: 96, heads: 6}}, tokens: 8K}}]"
    proc = run_launcher(["--out", str(tmp_path / "x"), *tiny(16384, "train.tokens=null", f"stages={stages}")],
                        check=False)
    assert proc.returncode != 0 and "stages[1].grow" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_flop_budget_counts_the_growth_fit():
    """A LiGO fit's tokens cost 8ND (forward, backward and the layerwise recompute), not 6ND: a
    FLOP budget that only 6ND fits is refused at load, and the same stages without a fit load."""
    from dsgrow.config import ConfigError
    from dsgrow.recipe import load_recipe
    from dsgrow.schedules.flops import flops_per_token

    def recipe(fit_steps: int, flops: float):
        stages = (f"[{{model: {SMALL}, tokens: 8192}}, {{grow: {{method: ligo, fit_steps: {fit_steps}}}, "
                  f"model: {{layers: 4, hidden: 128}}, tokens: 16384}}]")
        return load_recipe(None, ["train.tokens=null", "train.global_batch=16", "train.micro_batch=4",
                                  "train.seq_len=64", "model.max_seq_len=64", "data.vocab_size=512",
                                  f"budget={{flops: {flops}}}", f"stages={stages}"])

    base = recipe(0, 1e15)
    s0, s1 = base.stage_plan()
    f0 = 8192 * flops_per_token(s0.model.with_vocab(512), 64)
    f1 = flops_per_token(s1.model.with_vocab(512), 64)
    six_nd = f0 + 16384 * f1
    fit_tokens = 4 * 16 * 64
    recipe(4, six_nd + fit_tokens * f1 / 3 * 1.01)  # fits with the recompute counted
    with pytest.raises(ConfigError, match="budget.flops"):
        recipe(4, six_nd * 1.001)
