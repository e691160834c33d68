"""dsgrow as a plugin: `grow_engine` from a user's own DeepSpeed loop and from the HF Trainer,
2 real gloo ranks, ZeRO-3 partitioning really on (stage3_param_persistence_threshold 0)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, free_port


def run_ranks(script: str, args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    proc = subprocess.run([*cmd, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


LOOP = "launchers/examples/grow_in_your_loop.py"


def run_loop(tmp_path, stage: int, *extra: str) -> tuple[dict, list[dict]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    report = tmp_path / "loop.jsonl"
    run_ranks(LOOP, ["--zero_stage", str(stage), "--report", str(report), "--save_dir", str(tmp_path / "m"),
                     "--steps", "50", "--grow_at", "20", *extra])
    recs = records(report)
    growth = [r for r in recs if r.get("event") == "growth"]
    assert len(growth) == 1
    return growth[0], [r for r in recs if "loss" in r]


def offline_grow(tmp_path, method: str, *extra: str) -> dict:
    """What the offline `dsgrow grow` builds from the same small weights."""
    out = tmp_path / "offline"
    subprocess.run([sys.executable, "-m", "dsgrow.cli", "grow", "--src", str(tmp_path / "m" / "small"),
                    "--target", str(tmp_path / "m" / "grown"), "--method", method, "--fit-steps", "0",
                    "--out", str(out), *extra], cwd=REPO, check=True, capture_output=True, text=True)
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("stage,optimizer", [(1, "reset"), (2, "transfer"), (3, "reset")])
def test_user_loop_grows_mid_run_function_preserved(tmp_path, stage, optimizer):
    growth, steps = run_loop(tmp_path, stage, "--optimizer_state", optimizer)
    # FPI through the live engine swap: the same loss on a fixed held-out batch, fp32.
    assert growth["loss_after"] == pytest.approx(growth["loss_before"], abs=1e-5), growth
    if optimizer == "transfer":  # Adam's step count (20 steps before the growth), read back from the new engine
        assert growth["adam_step"] == 20 and growth["moments_written"] > 0 and "optimizer" in growth["phases"]
    else:
        assert growth["adam_step"] is None and "optimizer" not in growth["phases"]
    assert growth["large"]["layers"] == 4 and growth["large"]["hidden"] == 128 and growth["world_size"] == 2
    assert {"gather", "fit", "write", "engine"} <= set(growth["phases"])
    assert all(len(p["host_peak_mib"]) == 2 for p in growth["phases"].values())  # every rank's memory
    after = [s["loss"] for s in steps if s["step"] >= 20]
    assert all(s["layers"] == 4 for s in steps if s["step"] >= 20)
    assert sum(after[-5:]) / 5 < sum(after[:5]) / 5 - 0.1, after  # training goes on and the loss falls
    # The grown weights are the offline build's, tensor for tensor.
    grown = load_file(str(tmp_path / "m" / "grown" / "model.safetensors"))
    ref = offline_grow(tmp_path, "fpi")
    assert set(grown) == set(ref)
    assert all(torch.equal(grown[k], ref[k]) for k in grown)


def test_user_loop_grows_under_mup(tmp_path):
    """muP in a user's loop under ZeRO-3: 64 wide (the base) -> 128; the function is kept, the
    hidden matrices' LR halves with the width (same base LR, no retuning), and the exports fold
    muP away (plain transformers, the offline SP growth's weights)."""
    growth, steps = run_loop(tmp_path, 3, "--mup", "64")
    assert growth["loss_after"] == pytest.approx(growth["loss_before"], abs=1e-5), growth
    assert growth["large"]["parametrization"] == "mup" and growth["large"]["base_hidden"] == 64
    by_step = {s["step"]: s for s in steps}
    before, after = by_step[19], by_step[30]
    assert before["group_lrs"] == [before["lr"]] * 3  # hidden, embeddings, vectors at m = 1
    assert after["group_lrs"] == pytest.approx([after["lr"] / 2, after["lr"], after["lr"]])
    after_losses = [s["loss"] for s in steps if s["step"] >= 20]
    assert sum(after_losses[-5:]) / 5 < sum(after_losses[:5]) / 5 - 0.1, after_losses
    assert "dsgrow_mup" not in json.loads((tmp_path / "m" / "grown" / "config.json").read_text())
    grown = load_file(str(tmp_path / "m" / "grown" / "model.safetensors"))
    ref = offline_grow(tmp_path, "fpi")
    assert set(grown) == set(ref)
    assert all(torch.allclose(grown[k], ref[k], rtol=0, atol=1e-6) for k in grown)


def test_user_loop_ligo_equals_offline_build(tmp_path):
    # LiGO unfitted (its init is seeded, so the offline build can repeat it) under ZeRO-3.
    growth, _ = run_loop(tmp_path, 3, "--method", "ligo")
    grown = load_file(str(tmp_path / "m" / "grown" / "model.safetensors"))
    ref = offline_grow(tmp_path, "ligo")
    assert max((grown[k] - ref[k]).abs().max().item() for k in grown) <= 1e-6
    assert growth["operator_bytes"] > 0


@pytest.mark.parametrize("stage", [0, 3])
def test_grow_engine_preflight_and_rebuild(tmp_path, stage):
    """Bad requests: one line, before the engine is touched, which still trains. A good one: the
    new engine is the user's kind (optimizer class, group settings and split, scheduler)."""
    out = tmp_path / "checks.json"
    run_ranks("tests/drivers/grow_engine_checks.py", [str(out), str(stage)], nproc=2)
    r = json.loads(out.read_text())
    needles = {"unknown_family": "model_type 'opt'", "not_hf": "not a Hugging Face", "other_head": "GPT2Model",
               "shrink": "cannot shrink layers", "method_cannot": "integer multiples", "unknown_method": "magic",
               "unknown_option": "noise_level", "fit_without_data": "fit_data",
               "fit_data_not_inputs": "input_ids", "bert_fit_without_labels": "MLM labels",
               "transfer_not_preserving": "stack",
               "transfer_bert": "bert", "transfer_sgd": "SGD", "bad_optimizer_mode": "keep", "pipeline": "pipeline"}
    for name, needle in needles.items():
        msg = r["errors"][name]
        assert msg is not None and needle in msg and "\n" not in msg, (name, msg)
    assert r["untouched"]
    assert r["still_trains"][-1] < r["still_trains"][0]
    u = r["user_grown"]
    assert u["loss_after"] == pytest.approx(u["loss_before"], abs=1e-5)
    assert u["optimizer"]["class"] == "AdamW"
    decay, no_decay = u["optimizer"]["groups"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == [0.9, 0.95] and decay["eps"] == 1e-7 and decay["lr"] == 1e-3
    # The split follows the grown model: every matrix decays, no norm or bias does.
    assert (decay["matrix"], decay["vector"]) == (u["large_matrix"], 0)
    assert (no_decay["matrix"], no_decay["vector"]) == (0, u["large_vector"])
    assert u["trains"][-1] < u["trains"][0]
    c = r["config_grown"]
    assert [g["weight_decay"] for g in c["optimizer"]["groups"]] == [0.1, 0.0]  # the user's split, config's AdamW
    assert c["sched_after"] == c["sched_before"]  # the scheduler at its position, the LR where it was
    assert c["global_steps"] == [4, 4]
    assert c["trains"][-1] < c["trains"][0]
    # LLaMA with GQA (the kv groups grow with the heads) and BERT, as transformers builds them.
    llama, bert = r["families"]["llama"], r["families"]["bert"]
    assert llama["kv_heads"] == 4 and llama["layers"] == 4 and bert["layers"] == 3
    assert llama["loss_after"] == pytest.approx(llama["loss_before"], abs=1e-5)
    assert bert["loss_after"] == pytest.approx(bert["loss_before"], abs=1e-3)  # new post-LN layers: up to eps
    assert llama["trains"][-1] < llama["trains"][0] and bert["trains"][-1] < bert["trains"][0]
    if stage == 3:  # DeepSpeed's CPU Adam (optimizer offload), rebuilt from the ds_config
        o = r["offload"]
        assert o["optimizer"]["class"] == "DeepSpeedCPUAdam"
        assert [g["weight_decay"] for g in o["optimizer"]["groups"]] == [0.1, 0.0]
        assert o["loss_after"] == pytest.approx(o["loss_before"], abs=1e-5)
        assert o["trains"][-1] < o["trains"][0]


def test_hf_trainer_route_two_ranks(tmp_path):
    out = tmp_path / "hf.json"
    run_ranks("launchers/examples/grow_with_hf_trainer.py",
              ["--zero_stage", "3", "--grow_at", "20", "--steps_after", "20", "--out", str(tmp_path / "runs"),
               "--report", str(out)])
    r = json.loads(out.read_text())
    assert r["layers"] == 4
    assert r["grown"] == pytest.approx(r["before"], abs=1e-4)  # FPI: the held-out loss survives the growth
    assert r["after"] < r["grown"] - 0.05  # and the new Trainer trains the grown model on


def test_growth_schedule_is_a_pure_function_of_the_counter():
    from dsgrow import GrowthSchedule

    plan = GrowthSchedule(at_tokens=[100, 300], mode="rewarm", rewarm_tokens=50)
    assert [plan.due(t, 0) for t in (99, 100)] == [False, True]
    assert plan.due(350, 1) and not plan.due(350, 2) and plan.growths_by(350) == 2
    flat = lambda t: 1.0  # noqa: E731
    assert plan.lr(flat, 50) == 1.0 and plan.lr(flat, 125) == 0.5 and plan.lr(flat, 150) == 1.0
    assert GrowthSchedule(at_steps=[10], mode="restart").lr(lambda s: s, 14) == 4
    assert GrowthSchedule(at_steps=[10]).lr(lambda s: s, 14) == 14
    for bad in (dict(at_tokens=[5, 5]), dict(at_tokens=[1], at_steps=[1]), dict(mode="rewarm", at_steps=[1]),
                dict(mode="cosine")):
        with pytest.raises(ValueError):
            GrowthSchedule(**bad)
