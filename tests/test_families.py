"""HF <-> canonical conversion for gpt2, llama (GQA, tied and untied) and bert.

Round trips alone would pass a converter that swaps q and k both ways, so the layout itself is
checked against an independent forward pass written from the canonical key table.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from dsgrow.families import (
    ModelSpec, SpecError, build_hf_model, canonical_keys, canonical_shapes, from_canonical,
    load_hf_dir, logits, norm_position, save_hf_dir, to_canonical, validate_canonical,
)

# Distinct sizes (D=32, F=40, V=61, P=16) so a transposed or misrouted tensor cannot keep its shape.
SPECS = {
    "gpt2": ModelSpec("gpt2", layers=2, hidden=32, heads=4, ffn=40, vocab_size=61, max_seq_len=16),
    "gpt2-untied": ModelSpec("gpt2", layers=2, hidden=32, heads=4, ffn=40, vocab_size=61, max_seq_len=16,
                             tie_embeddings=False),
    "llama-gqa": ModelSpec("llama", layers=2, hidden=32, heads=4, kv_heads=2, ffn=40, vocab_size=61,
                           max_seq_len=16, rope_theta=500.0),
    "llama-gqa-tied": ModelSpec("llama", layers=2, hidden=32, heads=4, kv_heads=2, ffn=40, vocab_size=61,
                                max_seq_len=16, tie_embeddings=True),
    "bert": ModelSpec("bert", layers=2, hidden=32, heads=4, ffn=40, vocab_size=61, max_seq_len=16),
}
IDS = torch.tensor([[5, 17, 3, 60, 0, 42, 9, 11], [1, 2, 3, 4, 5, 6, 7, 8]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
TYPES = torch.tensor([[0] * 4 + [1] * 4, [0] * 8])


def random_model(spec, seed=0):
    """HF model whose every parameter (biases and norms too) is random, so misrouting shows."""
    model = build_hf_model(spec, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model


def hf_logits(spec, model):
    kwargs = {"attention_mask": MASK}
    if spec.family == "bert":
        kwargs["token_type_ids"] = TYPES
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def canon_logits(spec, c):
    return logits(spec, c, IDS, attention_mask=MASK, token_type_ids=TYPES if spec.family == "bert" else None)


# An independent forward pass over the canonical layout -----------------------------------------
def _lin(c, name, x):
    return F.linear(x, c[name + ".weight"], c.get(name + ".bias"))


def _norm(spec, c, name, x):
    if spec.family == "llama":  # RMSNorm
        return c[name + ".weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.eps))
    return F.layer_norm(x, (spec.hidden,), c[name + ".weight"], c[name + ".bias"], spec.eps)


def _rope(x, spec):
    # Half-split (rotate_half) convention: dim j pairs with dim j + hd/2 inside each head.
    hd, T = spec.head_dim, x.shape[-2]
    inv = 1.0 / spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attention(spec, c, p, x, mask):
    B, T, _ = x.shape
    H, KV, hd = spec.heads, spec.n_kv_heads, spec.head_dim
    q = _lin(c, p + "q", x).view(B, T, H, hd).transpose(1, 2)
    k = _lin(c, p + "k", x).view(B, T, KV, hd).transpose(1, 2)
    v = _lin(c, p + "v", x).view(B, T, KV, hd).transpose(1, 2)
    if spec.family == "llama":
        q, k = _rope(q, spec), _rope(k, spec)
    k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)  # query head h uses kv head h // (H/KV)
    allowed = mask[:, None, None, :].bool()
    if spec.causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed, float("-inf")).softmax(-1)
    return _lin(c, p + "o", (att @ v).transpose(1, 2).reshape(B, T, H * hd))


def reference_logits(spec, c, ids, mask, types):
    T = ids.shape[1]
    x = c["tok_emb"][ids]
    if "pos_emb" in c:
        x = x + c["pos_emb"][:T]
    if spec.family == "bert":
        x = _norm(spec, c, "emb_norm", x + c["type_emb"][types])
    for i in range(spec.layers):
        p = f"layers.{i}."
        if norm_position(spec) == "pre":
            x = x + _attention(spec, c, p, _norm(spec, c, p + "attn_norm", x), mask)
            h = _norm(spec, c, p + "mlp_norm", x)
            if spec.family == "llama":
                x = x + _lin(c, p + "down", F.silu(_lin(c, p + "gate", h)) * _lin(c, p + "up", h))
            else:
                x = x + _lin(c, p + "down", F.gelu(_lin(c, p + "up", h), approximate="tanh"))
        else:
            x = _norm(spec, c, p + "attn_norm", x + _attention(spec, c, p, x, mask))
            x = _norm(spec, c, p + "mlp_norm", x + _lin(c, p + "down", F.gelu(_lin(c, p + "up", x))))
    head = c["tok_emb"] if spec.tied else c["head.weight"]
    if spec.family == "bert":
        x = _norm(spec, c, "mlm.norm", F.gelu(_lin(c, "mlm.dense", x)))
        return x @ head.T + c["mlm.bias"]
    return _norm(spec, c, "final_norm", x) @ head.T


# Tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SPECS)
def test_state_dict_round_trip_is_bitwise(name):
    spec = SPECS[name]
    model = random_model(spec)
    sd = model.state_dict()
    c = to_canonical(spec, sd)
    assert list(c) == canonical_keys(spec)
    assert {k: tuple(v.shape) for k, v in c.items()} == canonical_shapes(spec)
    back = from_canonical(spec, c)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    again = to_canonical(spec, back)
    assert all(torch.equal(again[k], c[k]) for k in c)
    # Canonical tensors are copies: editing them must not reach into the HF model.
    c["tok_emb"].zero_()
    assert model.state_dict()[next(iter(sd))].abs().sum() > 0


@pytest.mark.parametrize("name", SPECS)
def test_consuming_conversion_gives_the_same_tensors_and_empties_the_layers(name):
    # consume=True (a grown layer streamed into an engine) must change what is kept, not the result.
    spec = SPECS[name]
    c = to_canonical(spec, random_model(spec).state_dict())
    want = from_canonical(spec, c)
    given = dict(c)
    got = from_canonical(spec, given, consume=True)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not [k for k in given if k.startswith("layers.")]  # every layer tensor handed over
    assert sorted(given) == sorted(k for k in c if not k.startswith("layers."))


@pytest.mark.parametrize("name", SPECS)
def test_logits_match_hf_and_the_layout_means_what_it_says(name):
    spec = SPECS[name]
    model = random_model(spec)
    c = to_canonical(spec, model.state_dict())
    ref = hf_logits(spec, model)
    got = canon_logits(spec, c)
    assert got.dtype == torch.float32 and got.shape == (2, 8, spec.vocab_size)
    assert torch.equal(got, ref)
    ours = reference_logits(spec, c, IDS, MASK, TYPES)
    valid = MASK.bool()  # padded query rows are undefined in HF's attention
    torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-4, atol=1e-4)


def test_untied_head_and_gqa_shapes():
    llama = canonical_shapes(SPECS["llama-gqa"])
    assert llama["layers.0.q.weight"] == (32, 32)
    assert llama["layers.0.k.weight"] == (16, 32) and llama["layers.1.v.weight"] == (16, 32)
    assert llama["layers.0.gate.weight"] == (40, 32) and llama["layers.0.down.weight"] == (32, 40)
    assert "head.weight" in llama and "pos_emb" not in llama and "layers.0.q.bias" not in llama
    assert "head.weight" not in canonical_shapes(SPECS["llama-gqa-tied"])
    bert = canonical_shapes(SPECS["bert"])
    assert bert["type_emb"] == (2, 32) and bert["mlm.bias"] == (61,) and "final_norm.weight" not in bert
    assert norm_position(SPECS["bert"]) == "post" and norm_position(SPECS["gpt2"]) == "pre"


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-gqa-tied", "bert"])
def test_save_hf_dir_loads_in_plain_transformers(name, tmp_path):
    spec = SPECS[name]
    c = to_canonical(spec, random_model(spec).state_dict())
    out = tmp_path / "model"
    save_hf_dir(spec, c, out)
    assert (out / "model.safetensors").is_file()
    config_text = (out / "config.json").read_text()
    assert "auto_map" not in config_text and "dsgrow" not in config_text  # nothing custom to import
    auto = tf.AutoModelForMaskedLM if spec.family == "bert" else tf.AutoModelForCausalLM
    plain = auto.from_pretrained(str(out), local_files_only=True).eval()
    assert torch.equal(hf_logits(spec, plain), canon_logits(spec, c))

    spec2, c2 = load_hf_dir(out)
    assert canonical_shapes(spec2) == canonical_shapes(spec) and spec2.tied == spec.tied
    assert spec2.eps == spec.eps and spec2.rope_theta == spec.rope_theta
    assert list(c2) == list(c) and all(torch.equal(c2[k], c[k]) for k in c)
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no .tmp-/.old- leftovers


def test_save_hf_dir_replaces_only_when_complete(tmp_path, monkeypatch):
    spec = SPECS["gpt2"]
    old = to_canonical(spec, random_model(spec, seed=1).state_dict())
    new = to_canonical(spec, random_model(spec, seed=2).state_dict())
    out = tmp_path / "model"
    save_hf_dir(spec, old, out)

    def broken_save(self, directory, **kwargs):
        os.makedirs(directory, exist_ok=True)
        (open(os.path.join(directory, "model.safetensors"), "wb")).write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf_dir(spec, new, out)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert torch.equal(load_hf_dir(out)[1]["tok_emb"], old["tok_emb"])

    save_hf_dir(spec, new, out)  # a good save does replace it
    assert torch.equal(load_hf_dir(out)[1]["tok_emb"], new["tok_emb"])
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_save_hf_dir_copies_tokenizer_files(tmp_path):
    spec = SPECS["llama-gqa"]
    c = to_canonical(spec, random_model(spec).state_dict())
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    (tok / "spm.model").write_bytes(b"\x00sp")
    (tok / "corpus_stats.txt").write_text("not a tokenizer file")
    save_hf_dir(spec, c, tmp_path / "m", tokenizer_dir=tok)
    names = set(os.listdir(tmp_path / "m"))
    assert {"tokenizer.json", "tokenizer_config.json", "spm.model", "config.json", "model.safetensors"} <= names
    assert "corpus_stats.txt" not in names
    with pytest.raises(FileNotFoundError, match="nowhere"):
        save_hf_dir(spec, c, tmp_path / "m2", tokenizer_dir=tmp_path / "nowhere")
    assert not (tmp_path / "m2").exists()


def test_load_hf_dir_sharded_and_missing(tmp_path):
    spec = SPECS["bert"]
    model = random_model(spec)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, c = load_hf_dir(tmp_path / "sharded")
    expected = to_canonical(spec, model.state_dict())
    assert all(torch.equal(c[k], expected[k]) for k in expected)

    with pytest.raises(FileNotFoundError, match="nope"):
        load_hf_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_dir(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_dir(tmp_path / "empty")


def test_validate_canonical_names_the_bad_key():
    spec = SPECS["llama-gqa"]
    c = to_canonical(spec, random_model(spec).state_dict())
    validate_canonical(spec, c)

    missing = {k: v for k, v in c.items() if k != "layers.1.k.weight"}
    with pytest.raises(SpecError, match=r"missing.*'layers\.1\.k\.weight'") as e:
        validate_canonical(spec, missing)
    assert "\n" not in str(e.value)

    wrong = dict(c, **{"layers.0.v.weight": torch.zeros(32, 32)})  # full heads where GQA has 2
    with pytest.raises(SpecError, match=r"'layers\.0\.v\.weight' has shape \[32, 32\], expected \[16, 32\]"):
        validate_canonical(spec, wrong)
    with pytest.raises(SpecError, match="'layers.0.q.bias'"):
        validate_canonical(spec, dict(c, **{"layers.0.q.bias": torch.zeros(32)}))
    with pytest.raises(SpecError, match="layers.1.k.weight"):
        from_canonical(spec, missing)


def test_to_canonical_accepts_base_model_and_legacy_keys_but_not_unknown_ones():
    spec = SPECS["gpt2"]
    model = random_model(spec)
    expected = to_canonical(spec, model.state_dict())
    bare = dict(model.transformer.state_dict())  # GPT2Model keys: "h.0....", no "transformer."
    bare["h.0.attn.bias"] = torch.ones(1, 1, 16, 16)  # causal-mask buffer of old checkpoints
    c = to_canonical(spec, bare)
    assert all(torch.equal(c[k], expected[k]) for k in expected)

    with pytest.raises(SpecError, match="unexpected key 'transformer.h.0.attn.rogue'"):
        to_canonical(spec, dict(model.state_dict(), **{"transformer.h.0.attn.rogue": torch.zeros(1)}))
    sd = dict(model.state_dict())
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(SpecError, match="missing 'transformer.h.1.mlp.c_fc.bias'"):
        to_canonical(spec, sd)
    untied = dict(model.state_dict(), **{"lm_head.weight": torch.zeros(61, 32)})
    with pytest.raises(SpecError, match="lm_head.weight"):
        to_canonical(spec, untied)  # the spec says tied but the head is not the embedding

    bspec = SPECS["bert"]
    bmodel = random_model(bspec)
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in bmodel.state_dict().items()}
    legacy["bert.embeddings.position_ids"] = torch.arange(16)[None]
    bc = to_canonical(bspec, legacy)
    bexp = to_canonical(bspec, bmodel.state_dict())
    assert all(torch.equal(bc[k], bexp[k]) for k in bexp)


def test_build_hf_model_seed_is_reproducible_and_leaves_global_rng_alone():
    spec = SPECS["llama-gqa"]
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_hf_model(spec, seed=7)
    after = torch.rand(3)
    b = build_hf_model(spec, seed=7)
    c = build_hf_model(spec, seed=8)
    assert torch.equal(before, after)
    assert not a.training and next(a.parameters()).dtype == torch.float32
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_from_hf_config_refuses_llama_it_cannot_rebuild():
    spec = SPECS["llama-gqa"]
    assert canonical_shapes(ModelSpec.from_hf_config(spec.to_hf_config())) == canonical_shapes(spec)
    cfg = spec.to_hf_config()
    cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    with pytest.raises(SpecError, match="rope_type 'linear'"):
        ModelSpec.from_hf_config(cfg)
    cfg = spec.to_hf_config()
    cfg.head_dim = 16
    with pytest.raises(SpecError, match="head_dim 16"):
        ModelSpec.from_hf_config(cfg)
