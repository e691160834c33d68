"""Evolving subnetwork training (dsgrow/subnet): exact subnetworks, the FLOPs that run, the optimizer
step, ZeRO-0..3 at 2 ranks, and a recipe that grows and then trains subnetworks, resumed mid-phase."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from dsgrow.config import ConfigError
from dsgrow.families.hf_io import build_hf_model
from dsgrow.families.spec import ModelSpec
from dsgrow.subnet import Subnetwork, SubnetError, counts, draw, est_config, flops_per_token

SPECS = {"gpt2": ModelSpec(family="gpt2", layers=4, hidden=64, heads=4, vocab_size=97, max_seq_len=32),
         "llama-gqa": ModelSpec(family="llama", layers=4, hidden=64, heads=8, kv_heads=2, vocab_size=97,
                                max_seq_len=32)}
HALF = {"phases": [{"until": 0.5, "layers": 0.5, "heads": 0.5, "ffn": 0.5}, {"until": 0.8, "heads": 0.5, "ffn": 0.5}]}


def blocks_of(model, spec):
    base = getattr(model, model.base_model_prefix)
    return base.h if spec.family == "gpt2" else base.layers


def units_removed(model, spec, s):
    """The full model with the sample's units removed by HF's own code: skipped blocks taken out of
    the block list; a dropped head's value (GPT-2) or query and output columns (LLaMA, whose kv
    group may be shared with a kept head) zeroed, so it adds exactly 0; a dropped neuron's input
    row zeroed (GELU(0) = 0, SiLU(gate) * 0 = 0); the kept heads' and neurons' outputs scaled."""
    m = copy.deepcopy(model)
    blocks = blocks_of(m, spec)
    hd, D = spec.head_dim, spec.hidden
    with torch.no_grad():
        for i in s.layers:
            blk = blocks[i]
            for h in sorted(set(range(spec.heads)) - set(s.heads[i].tolist())):
                cols = slice(h * hd, (h + 1) * hd)
                if spec.family == "gpt2":
                    blk.attn.c_attn.weight[:, 2 * D + h * hd:2 * D + (h + 1) * hd] = 0
                    blk.attn.c_attn.bias[2 * D + h * hd:2 * D + (h + 1) * hd] = 0
                else:
                    blk.self_attn.q_proj.weight[cols] = 0
                    blk.self_attn.o_proj.weight[:, cols] = 0
            drop = sorted(set(range(spec.ffn_dim)) - set(s.neurons[i].tolist()))
            if spec.family == "gpt2":
                blk.attn.c_proj.weight.mul_(s.head_scale)
                blk.mlp.c_fc.weight[:, drop] = 0
                blk.mlp.c_fc.bias[drop] = 0
                blk.mlp.c_proj.weight.mul_(s.ffn_scale)
            else:
                blk.self_attn.o_proj.weight.mul_(s.head_scale)
                blk.mlp.up_proj.weight[drop] = 0
                blk.mlp.down_proj.weight.mul_(s.ffn_scale)
        kept = torch.nn.ModuleList([blocks[i] for i in s.layers])
        if spec.family == "gpt2":
            m.transformer.h = kept
        else:
            m.model.layers = kept
        m.config.num_hidden_layers = len(s.layers)
    return m


@pytest.mark.parametrize("name", list(SPECS))
def test_subnetwork_equals_the_model_with_those_units_removed(name):
    spec = SPECS[name]
    model = build_hf_model(spec, seed=1).train()
    x = torch.randint(0, spec.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=x).logits
    est = Subnetwork(model, HALF, seed=5, spec=spec)
    assert torch.equal(model(input_ids=x).logits, before)  # installed, no sample: bitwise the model
    for step in range(3):
        with est.active(step, fraction=0.1) as s:
            assert len(s.layers) == 2 and all(len(h) == spec.heads // 2 for h in s.heads.values())
            out = model(input_ids=x, labels=x)
            out.loss.backward()
        ref = units_removed(model, spec, s)
        ref_out = ref(input_ids=x, labels=x)
        ref_out.loss.backward()
        assert torch.allclose(out.logits, ref_out.logits, rtol=0, atol=1e-5)
        assert (out.logits - before).abs().max() > 1e-2  # and not the full model
        # The gradient of every kept unit is the removed-units model's; a skipped block gets none.
        blocks, ref_blocks = blocks_of(model, spec), blocks_of(ref, spec)
        for j, i in enumerate(s.layers):
            if spec.family == "gpt2":
                hd = spec.head_dim
                q_cols = (s.heads[i][:, None] * hd + torch.arange(hd)).reshape(-1)
                pairs = [(blocks[i].attn.c_attn.weight.grad[:, q_cols], ref_blocks[j].attn.c_attn.weight.grad[:, q_cols]),
                         (blocks[i].mlp.c_fc.weight.grad[:, s.neurons[i]], ref_blocks[j].mlp.c_fc.weight.grad[:, s.neurons[i]])]
            else:
                pairs = [(blocks[i].self_attn.k_proj.weight.grad, ref_blocks[j].self_attn.k_proj.weight.grad),
                         (blocks[i].mlp.gate_proj.weight.grad[s.neurons[i]], ref_blocks[j].mlp.gate_proj.weight.grad[s.neurons[i]])]
            for a, b in pairs:
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
        for i in set(range(spec.layers)) - set(s.layers):
            assert all(p.grad is None for p in blocks[i].parameters())
        model.zero_grad(set_to_none=True)
    assert torch.equal(model(input_ids=x).logits, before)  # outside a step: the full model again


def test_draws_are_pure_functions_in_whole_kv_groups():
    spec = SPECS["llama-gqa"]
    cfg = est_config(HALF)
    ph = cfg.phase_at(0.1)
    a, b = draw(spec, ph, 7, 12), draw(spec, ph, 7, 12)
    assert a.to_dict() == b.to_dict()
    assert draw(spec, ph, 7, 13).to_dict() != a.to_dict() and draw(spec, ph, 8, 12).to_dict() != a.to_dict()
    group = spec.heads // spec.n_kv_heads
    for heads in a.heads.values():
        assert len(heads) == group and len(set((heads // group).tolist())) == 1  # one whole kv group of 4
    assert a.head_scale == 2.0 and a.ffn_scale == spec.ffn_dim / len(next(iter(a.neurons.values())))
    assert counts(spec, cfg.phase_at(0.6)).layers == 4 and draw(spec, cfg.phase_at(0.9), 7, 12) is None
    assert cfg.phase_at(0.5).layers == 1.0 and cfg.phase_at(0.49).layers == 0.5


@pytest.mark.parametrize("name", list(SPECS))
def test_flops_meter_counts_what_runs(name):
    from torch.utils.flop_counter import FlopCounterMode

    from dsgrow.schedules.flops import flops_per_token as full

    spec = SPECS[name]
    assert flops_per_token(spec, 32, None) == full(spec, 32)
    model = build_hf_model(spec, seed=1).train()
    model.config._attn_implementation = "eager"  # FlopCounterMode sees eager attention's matmuls
    est = Subnetwork(model, HALF, seed=1, spec=spec)
    x = torch.randint(0, spec.vocab_size, (2, 32))
    counted = {}
    for frac in (0.1, 0.6, 0.9):
        with est.active(3, frac), FlopCounterMode(display=False) as fc:
            model(input_ids=x, labels=x).loss.backward()
        counted[frac] = fc.get_total_flops() / x.numel()
        meter = est.flops_per_token(frac, 32)
        assert counted[frac] == pytest.approx(meter, rel=0.03), (frac, counted[frac], meter)
    assert counted[0.1] < 0.35 * counted[0.9] and counted[0.6] < 0.7 * counted[0.9]
    assert counted[0.1] / counted[0.9] == pytest.approx(est.flops_per_token(0.1, 32) / full(spec, 32), rel=0.01)


def test_a_step_moves_unsampled_units_only_by_weight_decay():
    """A fresh AdamW step (no momentum yet): unsampled heads' and neurons' weights only decay (their
    gradient is exactly 0); kept ones move by Adam's step; a skipped block has no gradient at all
    (torch's AdamW leaves it untouched; ZeRO's flat buffers give it a zero one: test below)."""
    spec = SPECS["gpt2"]
    model = build_hf_model(spec, seed=1).train()
    lr, wd = 1e-2, 0.1
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=lr, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, spec.vocab_size, (2, 32))
    est = Subnetwork(model, HALF, seed=2, spec=spec)
    with est.active(0, 0.1) as s:
        model(input_ids=x, labels=x).loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    i = s.layers[0]
    dropped = sorted(set(range(spec.ffn_dim)) - set(s.neurons[i].tolist()))
    w0, w1 = before[f"transformer.h.{i}.mlp.c_fc.weight"], after[f"transformer.h.{i}.mlp.c_fc.weight"].detach()
    assert torch.allclose(w1[:, dropped], w0[:, dropped] * (1 - lr * wd), rtol=0, atol=1e-8)
    kept_move = (w1[:, s.neurons[i]] - w0[:, s.neurons[i]] * (1 - lr * wd)).abs()
    assert kept_move.mean() > 0.5 * lr
    skipped = (set(range(spec.layers)) - set(s.layers)).pop()
    assert torch.equal(after[f"transformer.h.{skipped}.mlp.c_fc.weight"].detach(),
                       before[f"transformer.h.{skipped}.mlp.c_fc.weight"])


@pytest.mark.parametrize("raw,needle", [
    ({"method": "dropout"}, "is not one of est"),
    ({"phases": []}, "non-empty list"),
    ({"phases": [{"until": 0.5, "heads": 0.0}]}, "phases[0].heads must be a fraction in (0, 1]"),
    ({"phases": [{"until": 0.5}, {"until": 0.4}]}, "phases[1].until (0.4) must be after"),
    ({"phases": [{"until": 0.5, "neurons": 0.5}]}, "unknown recipe key train.subnetwork.phases[0].neurons"),
    ({"scale": "yes"}, "train.subnetwork.scale: expected bool"),
])
def test_bad_subnetwork_settings_are_one_line(raw, needle):
    with pytest.raises(ConfigError) as e:
        est_config(raw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_subnetwork_recipes_fail_at_load():
    from dsgrow.recipe import load_recipe

    with pytest.raises(ConfigError, match="runs on gpt2, llama, not bert"):
        load_recipe(None, ["stages=null", "train.tokens=10000", "model.family=bert", "train.subnetwork={method: est}"])
    with pytest.raises(ConfigError, match=r"train.subnetwork.phases\[0\].until"):
        load_recipe(None, ["stages=null", "train.tokens=10000", "train.subnetwork={phases: [{until: 2}]}"])
    with pytest.raises(SubnetError, match="not supported"):
        Subnetwork(build_hf_model(ModelSpec(family="bert", vocab_size=50), seed=0), {})


def test_est_in_a_user_loop_under_zero_0_to_3(tmp_path):
    """2 real ranks, one model and data per stage: every rank draws the same subnetworks; ZeRO-0/1/2
    give the same weights; ZeRO-3 (partitioning on) the same losses (its skipped layers' stale
    gradient buffers cleared: without that its losses leave ZeRO-0's by >1e-2 from the third step)."""
    from test_plugin import run_ranks

    out = tmp_path / "est.json"
    run_ranks("tests/drivers/est_zero.py", [str(out)])
    r = json.loads(out.read_text())
    for key, v in r.items():
        assert v["same_draws"], key
        ref = r[key.split("-")[0] + "-zero0"]["losses"]
        assert max(abs(a - b) for a, b in zip(v["losses"], ref)) < 2e-3, (key, v["losses"], ref)
        assert v["losses"][-1] < v["losses"][0] - 0.1, key
        if not key.endswith("zero3"):
            assert v["max_weight_diff_vs_zero0"] < 1e-4, key
    # ZeRO-3 gathers whole parameters: an EST step never gathers less than the subnetwork needs.
    for fam in ("gpt2", "llama"):
        g = r[f"{fam}-zero3"]["gathered"]
        assert set(g) == {"skip", "sliced", "full"} and min(g["full"]) > 0


BLOCK = 8 * 32  # tokens per optimizer step below


def est_args(out, *sets: str) -> list[str]:
    base = ["model.layers=2", "model.hidden=32", "model.heads=4", "model.max_seq_len=32", "data.vocab_size=256",
            "train.seq_len=32", "train.micro_batch=8", "train.global_batch=8", "train.lr=1e-2",
            "train.eval_samples=16", "train.log_every=1", f"train.eval_every={8 * BLOCK}",
            f"train.checkpoint_every={2 * BLOCK}", f"train.warmup_tokens={2 * BLOCK}", "train.tokens=null",
            f"stages=[{{tokens: {6 * BLOCK}}}, {{grow: {{method: hyperclone, noise: 0.01}}, model: {{layers: 4, "
            f"hidden: 64, heads: 8}}, tokens: {16 * BLOCK}, train: {{subnetwork: {{phases: [{{until: 0.25, "
            f"layers: 0.5, heads: 0.5, ffn: 0.5}}, {{until: 0.5, heads: 0.5, ffn: 0.5}}]}}}}}}]"]
    return ["--out", str(out), *[a for s in (*base, *sets) for a in ("--set", s)]]


def test_est_inside_a_grown_stage_counts_its_flops_and_resumes_mid_phase(tmp_path):
    """Grow 2x32 -> 4x64, then EST in the grown stage (phases at 25% / 50% of its 16 steps).
    Killed in phase 1 (half the layers) and resumed from the checkpoint before: the same sampled
    sequence, so bitwise the uninterrupted run's weights, losses and FLOPs."""
    from conftest import run_launcher

    from dsgrow.schedules.flops import flops_per_token as full
    from dsgrow.subnet import EstPhase

    a, b = tmp_path / "a", tmp_path / "b"
    run_launcher(est_args(a))
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    grown = [r for r in rows if r.get("stage") == 1 and "loss" in r]
    assert len(grown) == 16
    large = ModelSpec(family="gpt2", layers=4, hidden=64, heads=8, vocab_size=256, max_seq_len=32)
    fracs = [r["subnet_flops_frac"] for r in grown]
    phase1 = flops_per_token(large, 32, EstPhase(layers=0.5, heads=0.5, ffn=0.5)) / full(large, 32)
    phase2 = flops_per_token(large, 32, EstPhase(heads=0.5, ffn=0.5)) / full(large, 32)
    assert fracs == pytest.approx([phase1] * 4 + [phase2] * 4 + [1.0] * 8)
    assert phase1 < 0.45 and phase2 < 0.75
    # Each step adds what ran: its tokens x its subnetwork's FLOPs per token.
    step_flops = [y["flops"] - x["flops"] for x, y in zip(grown, grown[1:])]
    assert step_flops == pytest.approx([f * BLOCK * full(large, 32) for f in fracs[1:]], rel=1e-9)
    vals = [r["val_loss"] for r in rows if "val_loss" in r and r.get("event") is None]
    assert vals[-1] < vals[0] - 0.3
    # Killed at global step 9 (the grown stage's 3rd step, phase 1); the last checkpoint is step 8.
    killed = run_launcher(est_args(b), env={"DSGROW_FAULT": "step:step9"}, check=False)
    assert killed.returncode != 0
    run_launcher([*est_args(b), "--resume"])
    wa, wb = load_file(str(a / "final_model" / "model.safetensors")), load_file(str(b / "final_model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["flops"] == sb["flops"] and sa["val_loss"] == sb["val_loss"]


def test_hf_trainer_callback_trains_subnetworks_then_the_full_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    from dsgrow.hf_trainer import SubnetworkCallback

    spec = ModelSpec(family="gpt2", layers=4, hidden=32, heads=4, vocab_size=97, max_seq_len=16)
    model = build_hf_model(spec, seed=0).train()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (48, 16), generator=g)]
    calls = []  # blocks whose attention ran, per forward
    for i, blk in enumerate(model.transformer.h):
        blk.attn.register_forward_pre_hook(lambda m, a, i=i: calls[-1].add(i) if calls else None)
    model.register_forward_pre_hook(lambda m, a, k: calls.append(set()), with_kwargs=True)
    cb = SubnetworkCallback({"phases": [{"until": 0.5, "layers": 0.5, "heads": 0.5, "ffn": 0.5}]}, seed=3)
    args = TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, logging_steps=100)
    Trainer(model, args, train_dataset=data, callbacks=[cb]).train()
    # 6 steps x 2 micro-batches: steps 0-2 run 2 of 4 blocks (both micro-batches the same 2), then all.
    assert [len(c) for c in calls] == [2] * 6 + [4] * 6, calls
    assert all(calls[2 * s] == calls[2 * s + 1] for s in range(3))
    assert cb.est.sliced.sample is None  # the full model after training
