"""Copy-based growth must break the symmetry between a copied unit and its twin.

A copy map (FPI, HyperCloning, the width part of stacking / interpolation, AKI's top layer) starts
each new unit equal to the old one it copies. With dropout 0 the twins get identical gradients and
Adam keeps them bitwise equal forever, so the "large" model trains as the small-width one. In the
form each paper recommends (dsgrow.growth.PAPER_FORMS) the twins must differ after a few steps;
the unbroken forms are checked to stay twins, which is what makes the first check able to fail.
"""
import pytest
import torch

from dsgrow.families import ModelSpec, build_hf_model, from_canonical, logits, to_canonical
from dsgrow.growth import PAPER_FORMS, GrowthError, grow_canonical, resolve_target
from dsgrow.growth.net2net import fpi_maps
from test_families import random_model

V, P = 61, 16
TARGET = {"layers": 4, "hidden": 64, "ffn": 96}  # every width x2 (hyperclone: multiples only), depth x2
SMALL = {"gpt2": ModelSpec("gpt2", layers=2, hidden=32, heads=4, ffn=48, vocab_size=V, max_seq_len=P),
         "llama-gqa": ModelSpec("llama", layers=2, hidden=32, heads=4, kv_heads=2, ffn=48, vocab_size=V,
                                max_seq_len=P)}


def train_a_few_steps(small, method, opts, steps=5):
    """The grown model after `steps` AdamW steps on random tokens (HF model, dropout 0), canonical."""
    c = to_canonical(small, random_model(small, 0).state_dict())
    large = resolve_target(small, TARGET)
    grown = grow_canonical(small, c, TARGET, method, **opts)
    model = build_hf_model(large)
    model.load_state_dict(from_canonical(large, grown))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, V, (4, P), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return large, to_canonical(large, model.state_dict())


def twin_gaps(small, large, weights) -> dict:
    """Per copied tensor, the smallest max-abs difference between a copied unit and its first twin:
    residual coordinates (token embedding columns), MLP neurons (up rows) and query heads (q rows)
    of every layer."""
    maps = fpi_maps(small, large, "even")  # every copy-based operator here copies with these twins
    gaps = {}
    checks = [("tok_emb", "res", 1)] + [(f"layers.{l}.{s}", a, 0) for l in range(large.layers)
                                        for s, a in (("up.weight", "ffn"), ("q.weight", "q"))]
    for key, axis, dim in checks:
        m = maps[axis]
        units = weights[key].movedim(dim, 0).reshape(m.n2, m.unit, -1)
        first, gap = {}, float("inf")
        for i, j in enumerate(m.idx.tolist()):
            if j in first:
                gap = min(gap, float((units[i] - units[first[j]]).abs().max()))
            else:
                first[j] = i
        gaps[key] = gap
    return gaps


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("method", sorted(PAPER_FORMS))
def test_paper_form_copies_differ_after_a_few_steps(name, method):
    small = SMALL[name]
    large, after = train_a_few_steps(small, method, PAPER_FORMS[method])
    gaps = twin_gaps(small, large, after)
    assert min(gaps.values()) > 1e-5, {k: v for k, v in gaps.items() if v <= 1e-5}


@pytest.mark.parametrize("method", ["fpi", "hyperclone", "stack", "interpolate", "aki"])
def test_unbroken_forms_keep_twins(method):
    """Without noise the twins stay bitwise equal (every twin for the pure copy maps; AKI's mixing
    separates the layers that read a layer above, but not the copies of the top small layer)."""
    small = SMALL["gpt2"]
    large, after = train_a_few_steps(small, method, {})
    gaps = twin_gaps(small, large, after)
    if method == "aki":
        assert gaps["layers.1.up.weight"] == 0.0 and gaps["layers.3.q.weight"] == 0.0  # top-layer copies
        assert gaps["layers.0.up.weight"] > 1e-5
    else:
        assert max(gaps.values()) == 0.0, gaps


@pytest.mark.parametrize("method", ["fpi", "hyperclone"])
def test_paper_form_noise_keeps_the_function(method):
    """The noise is zero-sum over the copies a tensor reads: the function-preserving operators stay
    function preserving (fp32 rounding only), with the noise present in the weights."""
    small = SMALL["llama-gqa"]
    c = to_canonical(small, random_model(small, 0).state_dict())
    large = resolve_target(small, TARGET)
    plain = grow_canonical(small, c, TARGET, method)
    noisy = grow_canonical(small, c, TARGET, method, **PAPER_FORMS[method])
    ids = torch.randint(0, V, (2, P), generator=torch.Generator().manual_seed(3))
    ref = logits(small, c, ids)
    assert float((logits(large, noisy, ids) - ref).abs().max()) < 1e-4
    # identity layers (large layers 1 and 3) start with zero residual writers: their copies get
    # noise too, scaled from the layer they copy, or their MLP twins would never separate
    for key in ("layers.0.down.weight", "layers.1.down.weight", "layers.1.o.weight"):
        assert float((noisy[key] - plain[key]).abs().max()) > 1e-3, key


def fitted_ligo(small, c, **opts):
    """LiGO grown with its width as copies (init fpi) and 3 fit steps on random tokens."""
    data = torch.randint(0, V, (16, P), generator=torch.Generator().manual_seed(2))
    return grow_canonical(small, c, TARGET, "ligo", data=data, fit_steps=3, init="fpi", lr=1e-2, batch_size=4,
                          **opts)


@pytest.mark.parametrize("name", list(SMALL))
def test_ligo_copy_init_stays_a_copy_through_the_fit_until_symmetry_noise_breaks_it(name):
    """Fitting a copy init keeps every twin equal (swapping twins is a symmetry of the loss), so the
    fitted model needs FPI's noise: with `symmetry_noise` it computes the same function (fp32
    rounding), its twins differ in the weights, and after training they have grown apart."""
    small = SMALL[name]
    c = to_canonical(small, random_model(small, 0).state_dict())
    large = resolve_target(small, TARGET)
    plain, noisy = fitted_ligo(small, c), fitted_ligo(small, c, symmetry_noise=0.2)
    moved = grow_canonical(small, c, TARGET, "ligo", init="fpi")
    assert max(float((plain[k] - moved[k]).abs().max()) for k in plain) > 1e-3  # the fit did move the model
    assert max(twin_gaps(small, large, plain).values()) < 1e-6  # ... and kept the copies
    ids = torch.randint(0, V, (2, P), generator=torch.Generator().manual_seed(3))
    assert float((logits(large, noisy, ids) - logits(large, plain, ids)).abs().max()) < 1e-4
    for key in ("layers.0.q.weight", "layers.1.down.weight", "layers.3.o.weight"):
        assert float((noisy[key] - plain[key]).abs().max()) > 1e-3, key
    _, after = train_a_few_steps(small, "ligo", {"init": "fpi", "symmetry_noise": 0.2})
    assert min(twin_gaps(small, large, after).values()) > 1e-5


@pytest.mark.parametrize("name", list(SMALL))
def test_ligo_copy_init_with_symmetry_noise_and_no_fit_is_fpi_with_noise(name):
    """The noise is FPI's, scaled by the same tensors: no fit steps gives FPI with noise exactly."""
    small = SMALL[name]
    c = to_canonical(small, random_model(small, 0).state_dict())
    a = grow_canonical(small, c, TARGET, "ligo", init="fpi", symmetry_noise=0.2)
    b = grow_canonical(small, c, TARGET, "fpi", noise=0.2)
    assert max(float((a[k] - b[k]).abs().max()) for k in b) < 1e-6


def test_symmetry_noise_needs_a_copy_init():
    small = SMALL["gpt2"]
    c = to_canonical(small, random_model(small, 0).state_dict())
    with pytest.raises(GrowthError, match="symmetry_noise needs a copy init"):
        grow_canonical(small, c, TARGET, "ligo", symmetry_noise=0.2)
    with pytest.raises(GrowthError, match="symmetry_noise must be a number >= 0"):
        grow_canonical(small, c, TARGET, "ligo", init="fpi", symmetry_noise=-1)


def test_ligo_symmetry_noise_builds_a_source_layers_maps_once_per_large_layer():
    """Making a noisy large layer (materialise or stream) builds its source layer's maps once for
    the noise, not once per tensor (with pinv tying each build is a solve). The streamed layer itself
    needs one build per small layer; the noise adds exactly one."""
    from dsgrow.growth import LiGO
    from dsgrow.growth.stream import ligo_stream

    small = SMALL["llama-gqa"]
    c = to_canonical(small, random_model(small, 0).state_dict())
    large = resolve_target(small, TARGET)
    op = LiGO(small, c, large, init="fpi", symmetry_noise=0.2, tying="pinv")
    built, layer_maps = [], op.layer_maps
    op.layer_maps = lambda j, res: built.append(j) or layer_maps(j, res)
    stream = ligo_stream(op)
    for i in range(large.layers):
        built.clear()
        stream(f"model.layers.{i}.self_attn.q_proj.weight")
        assert len(built) == small.layers + 1, (i, built)
    built.clear()
    op.materialize()
    assert len(built) == small.layers + large.layers  # the widening once, then one per noisy layer
