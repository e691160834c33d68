"""muP: the parametrisation itself (init, multipliers, LR groups), function preservation of every
growth operator under it, exports that plain transformers reads with the same logits, and the
coordinate check (activations flat in width under muP, fanning out under SP)."""
import dataclasses
import json
import math

import pytest
import torch

from dsgrow.families import ModelSpec, SpecError, build_hf_model, canonical_keys, logits, save_hf_dir, to_canonical
from dsgrow.families import mup
from dsgrow.growth import GrowthError, grow_canonical, resolve_target
from test_benchmarks import bench_module
from test_growth import FP_IDS, FP_METHODS, FP_TARGET, IDS, SMALL, TOL, random_canonical

# Small models at width multiplier 2 (base 16 < hidden 32), with base_head_dim 4 != head_dim 8 on
# the families with head_dim free to differ, so the attention factor and its fold are exercised.
MUP_SMALL = {name: dataclasses.replace(spec, parametrization="mup", base_hidden=16,
                                       base_head_dim=None if name.startswith("llama") else 4)
             for name, spec in SMALL.items()}


def test_base_width_mup_is_sp_bitwise():
    # At width multiplier 1 with head_dim = base_head_dim, muP changes nothing: same seed, same logits.
    for name, spec in SMALL.items():
        mu = dataclasses.replace(spec, parametrization="mup", base_hidden=spec.hidden)
        a, b = build_hf_model(spec, seed=3), build_hf_model(mu, seed=3)
        kw = {"token_type_ids": torch.zeros_like(IDS)} if spec.family == "bert" else {}
        with torch.no_grad():
            assert torch.equal(a(input_ids=IDS, **kw).logits, b(input_ids=IDS, **kw).logits), name


def test_init_multipliers_and_groups():
    spec = ModelSpec("gpt2", layers=2, hidden=256, heads=4, vocab_size=97, max_seq_len=16,
                     parametrization="mup", base_hidden=64, base_head_dim=16)
    assert spec.width_mult == 4.0 and spec.attn_scale == pytest.approx(4 / 64)
    sp = build_hf_model(spec.as_sp(), seed=0)
    mu = build_hf_model(spec, seed=0)
    # Hidden matrices: the SP draw / sqrt(m); embeddings (the tied head) and vectors untouched.
    for (n, a), (_, b) in zip(sp.named_parameters(), mu.named_parameters()):
        want = a / 2 if mup.is_hidden(n, a.shape) else a
        assert torch.allclose(b, want, rtol=0, atol=1e-7), n
    assert all(m.scaling == spec.attn_scale for m in mu.modules() if type(m).__name__ == "GPT2Attention")
    # The readout reads its input / m: the muP model's logits are those of its folded SP twin.
    c = to_canonical(spec, mu.state_dict())
    sp_spec, folded = mup.fold(spec, c)
    assert not sp_spec.mup
    assert torch.allclose(logits(spec, c, IDS % 97), logits(sp_spec, folded, IDS % 97), atol=1e-6)
    groups = mup.param_groups(mu, 0.1, lr=0.01)
    hidden, matrices, vectors = groups
    assert hidden["lr_scale"] == 0.25 and hidden["lr"] == 0.0025 and hidden["mup"] == "hidden"
    assert matrices["lr"] == 0.01 and vectors["lr"] == 0.01 and vectors["weight_decay"] == 0.0
    names = {id(p): n for n, p in mu.named_parameters()}
    assert all(".attn." in names[id(p)] or ".mlp." in names[id(p)] for p in hidden["params"])
    assert [names[id(p)] for p in matrices["params"]] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert sum(len(g["params"]) for g in groups) == len(list(mu.parameters()))
    # A growth keeps the base LR (0.01) and gives the hidden group the large width's 1/m.
    carried = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    mup.rescale_groups(carried, dataclasses.replace(spec, hidden=512, heads=8))
    assert carried[0]["lr_scale"] == 0.125 and carried[0]["lr"] == pytest.approx(0.00125)
    assert carried[1]["lr"] == 0.01


def test_first_adam_step_follows_the_multipliers():
    # Adam's first step moves every entry by ~LR (sign of the gradient): hidden matrices by LR/m.
    spec = ModelSpec("llama", layers=1, hidden=64, heads=4, kv_heads=2, vocab_size=97, max_seq_len=16,
                     parametrization="mup", base_hidden=16)
    model = build_hf_model(spec, seed=0).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(mup.param_groups(model, 0.0, lr=1e-3), eps=1e-12)
    model(input_ids=IDS % 97, labels=IDS % 97).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        step = (p.detach() - before[n]).abs()
        moved = step[step > 0]
        want = 1e-3 / 4 if mup.is_hidden(n, p.shape) else 1e-3
        assert moved.numel() and torch.allclose(moved, torch.full_like(moved, want), rtol=1e-3), n


def test_spec_and_growth_errors_are_one_line():
    base = dict(family="gpt2", vocab_size=97)
    for kw, needle in (({"base_hidden": 64}, "parametrization: mup"), ({"parametrization": "mup"}, "base_hidden is required"),
                       ({"parametrization": "mu-p"}, "unknown 'mu-p'"),
                       ({"parametrization": "mup", "base_hidden": 0}, "positive integer")):
        with pytest.raises(SpecError, match=needle) as e:
            ModelSpec(**base, **kw)
        assert "\n" not in str(e.value)
    small = MUP_SMALL["gpt2"]
    c = random_canonical(small)
    for target, needle in ((dataclasses.replace(resolve_target(small, FP_TARGET), base_hidden=32), "base_hidden must match"),
                           (resolve_target(small, FP_TARGET).as_sp(), "parametrization must match")):
        with pytest.raises(GrowthError, match=needle):
            grow_canonical(small, c, target, "fpi")


@pytest.mark.parametrize("name", list(MUP_SMALL))
@pytest.mark.parametrize("method,opts", FP_METHODS, ids=FP_IDS)
def test_function_preserving_growth_under_mup(name, method, opts):
    small = MUP_SMALL[name]
    c = random_canonical(small)
    target = dict(FP_TARGET, ffn=96) if method == "hyperclone" else FP_TARGET
    big = grow_canonical(small, c, target, method, **opts)
    large = resolve_target(small, target)
    assert large.mup and large.width_mult == 4.0 and list(big) == canonical_keys(large)
    diff = (logits(large, big, IDS) - logits(small, c, IDS)).abs().max()
    assert float(diff) < TOL
    # Read as SP (the readout multiplier ignored), the grown weights are another function: the
    # preservation above rests on muP's multipliers, not on them being inert.
    assert float((logits(large.as_sp(), big, IDS) - logits(small, c, IDS)).abs().max()) > 1e-2


@pytest.mark.parametrize("name", ["gpt2", "gpt2-untied", "llama-gqa", "bert"])
def test_export_folds_into_plain_transformers(tmp_path, name):
    import transformers as tf

    spec = MUP_SMALL[name]
    c = random_canonical(spec)
    save_hf_dir(spec, c, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert mup.MUP_CONFIG_KEY not in cfg  # plain transformers knows nothing of muP
    cls = tf.AutoModelForMaskedLM if spec.family == "bert" else tf.AutoModelForCausalLM
    plain = cls.from_pretrained(str(tmp_path / "m"), local_files_only=True).eval()
    kw = {"token_type_ids": torch.zeros_like(IDS)} if spec.family == "bert" else {}
    with torch.no_grad():
        theirs = plain(input_ids=IDS, **kw).logits
    ours = logits(spec, c, IDS, token_type_ids=kw.get("token_type_ids"))
    assert float((theirs - ours).abs().max()) < TOL
    # And back: unfolding the export gives the muP weights again.
    from dsgrow.families import load_hf_dir

    _, loaded = load_hf_dir(tmp_path / "m")
    back = mup.unfold(spec, loaded)
    assert all(torch.allclose(back[k], c[k], atol=1e-6) for k in c)


def test_coord_check_flat_under_mup_not_under_sp():
    cc = bench_module("mup_coord_check")
    widths, steps = [32, 64, 128, 256], 3  # an 8x range
    batches = cc.byte_batches(steps)
    spread = {par: cc.spread(cc.coord_check("gpt2", widths, par, steps, 1e-2, 0, batches), steps - 1)
              for par in ("sp", "mup")}
    assert max(spread["mup"].values()) < 2.0, spread
    assert max(spread["sp"].values()) > 4.0, spread
    assert all(spread["sp"][k] > spread["mup"][k] for k in ("block.0", "block.1", "logits")), spread


BLOCK = 8 * 32  # tokens per optimizer step below


def mup_args(out, *sets: str) -> list[str]:
    base = ["model.layers=2", "model.hidden=32", "model.heads=4", "model.max_seq_len=32", "model.parametrization=mup",
            "model.base_hidden=32", "data.vocab_size=256", "train.seq_len=32", "train.micro_batch=8",
            "train.global_batch=8", "train.lr=1e-2", "train.eval_samples=16", "train.log_every=1",
            f"train.eval_every={5 * BLOCK}", "train.checkpoint_every=0", f"train.warmup_tokens={2 * BLOCK}"]
    return ["--out", str(out), *[a for s in (*base, *sets) for a in ("--set", s)]]


def test_mup_recipe_grows_exports_and_restarts_from_its_export(tmp_path):
    from conftest import run_launcher

    from dsgrow.recipe import load_recipe

    # Bad muP settings in a recipe: one line at load, before any step.
    with pytest.raises(Exception, match="base_hidden must match") as e:
        load_recipe(None, mup_args(tmp_path, "train.tokens=null",
                                   f"stages=[{{tokens: {10 * BLOCK}}}, {{grow: {{method: fpi}}, model: {{hidden: 64, "
                                   f"heads: 8, base_hidden: 64}}, tokens: {10 * BLOCK}}}]")[3::2])
    assert "\n" not in str(e.value)
    # 32 wide (the base) for 10 steps, FPI to 64 wide (m = 2) for 10 more, through the launcher.
    a = tmp_path / "a"
    run_launcher(mup_args(a, "train.tokens=null", f"stages=[{{tokens: {10 * BLOCK}}}, {{grow: {{method: fpi}}, "
                                                 f"model: {{hidden: 64, heads: 8}}, tokens: {10 * BLOCK}}}]"))
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    growth = next(r for r in rows if r.get("event") == "growth")
    assert growth["loss_after"] == pytest.approx(growth["loss_before"], abs=1e-5)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.2
    assert mup.MUP_CONFIG_KEY not in json.loads((a / "final_model" / "config.json").read_text())
    # A muP recipe started from that (folded, SP) export unfolds it: the same function at step 0.
    b = tmp_path / "b"
    run_launcher(mup_args(b, "stages=null", f"train.tokens={BLOCK}", "model.hidden=64", "model.heads=8",
                          f"train.init_from={a / 'final_model'}"))
    first = json.loads((b / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(vals[-1], abs=1e-5)


def test_mup_transfer_runs_are_reused_only_when_everything_matches(tmp_path, monkeypatch):
    mt = bench_module("mup_transfer")
    cfg = dict(mt.QUICK, evals=1, eval_batches=1)
    runs = mt.Runs(cfg, tmp_path)
    spec = mt.spec_of(1, 32, 2, "mup", 16, cfg["seq"])
    first = runs.run(spec, 1e-3, 2, 1, keep=True)
    assert len(first["curve"]) == 2 and first["flops"] > 0 and set(first["weights"]) == set(canonical_keys(spec))
    calls = []
    train = runs._train
    monkeypatch.setattr(runs, "_train", lambda *a, **k: (calls.append(a[1]), train(*a, **k))[1])
    again = runs.run(spec, 1e-3, 2, 1, keep=True)
    assert calls == [] and again["final_val"] == first["final_val"]
    assert all(torch.equal(again["weights"][k], first["weights"][k]) for k in first["weights"])
    runs.run(spec, 2e-3, 2, 1)                                          # another LR
    runs.run(dataclasses.replace(spec, base_hidden=32), 1e-3, 2, 1)     # another muP base
    runs.run(spec, 1e-3, 2, 1, init=first["weights"], init_key="from x")  # another starting point
    runs.code = "0" * 16
    runs.run(spec, 1e-3, 2, 1)                                          # another code version
    assert len(calls) == 4


def test_checkpoints_from_before_mup_resume_under_the_default():
    import copy

    from dsgrow.config import ConfigError
    from dsgrow.recipe import load_recipe
    from dsgrow.run.setup import check_resume_recipe

    current = load_recipe(None, []).to_dict()
    saved = copy.deepcopy(current)
    for k in ("parametrization", "base_hidden", "base_head_dim"):  # a recipe.yaml written before muP existed
        saved["model"].pop(k)
    check_resume_recipe(saved, current)
    muP = copy.deepcopy(current)
    muP["model"].update(parametrization="mup", base_hidden=128)
    with pytest.raises(ConfigError, match="model.base_hidden"):
        check_resume_recipe(saved, muP)
