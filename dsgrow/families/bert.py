"""BERT (BertForMaskedLM) <-> canonical.

BERT is post-LN: attention.output.LayerNorm normalises (x + attn(x)) and is canonical
``attn_norm``; output.LayerNorm normalises (h + mlp(h)) and is ``mlp_norm``.

The MLM decoder's output bias exists twice in HF (cls.predictions.bias and
cls.predictions.decoder.bias). When tied they are one tensor; when untied only decoder.bias is
used by forward, so that one is canonical ``mlm.bias`` and both HF names get it on the way out.
"""
from __future__ import annotations

from .canonical import HFReader, own
from .spec import ModelSpec

PREFIX = "bert."
IGNORE = (
    r"embeddings\.(position_ids|token_type_ids)$",  # buffers, persistent in older transformers
    r"^bert\.pooler\.", r"^cls\.seq_relationship\.",  # NSP head of BertForPreTraining: unused by MLM
)

_EMB = {"tok_emb": "embeddings.word_embeddings.weight", "pos_emb": "embeddings.position_embeddings.weight",
        "type_emb": "embeddings.token_type_embeddings.weight", "emb_norm.weight": "embeddings.LayerNorm.weight",
        "emb_norm.bias": "embeddings.LayerNorm.bias"}
_PER_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
              "o": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
              "up": "intermediate.dense", "down": "output.dense", "mlp_norm": "output.LayerNorm"}
_MLM = {"mlm.dense": "cls.predictions.transform.dense", "mlm.norm": "cls.predictions.transform.LayerNorm"}


def _renamed_gamma_beta(sd: dict) -> dict:
    # The original Google/TF-converted checkpoints name LayerNorm parameters gamma/beta.
    out = {}
    for k, v in sd.items():
        if ".LayerNorm." in k:
            k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


def to_canonical(spec: ModelSpec, hf_state_dict: dict) -> dict:
    r = HFReader("bert", _renamed_gamma_beta(hf_state_dict), PREFIX, head_prefixes=("cls.",), ignore=IGNORE)
    c = {ours: own(r.take(PREFIX + theirs)) for ours, theirs in _EMB.items()}
    for i in range(spec.layers):
        for ours, theirs in _PER_LAYER.items():
            for part in ("weight", "bias"):
                c[f"layers.{i}.{ours}.{part}"] = own(r.take(f"{PREFIX}encoder.layer.{i}.{theirs}.{part}"))
    for ours, theirs in _MLM.items():
        for part in ("weight", "bias"):
            c[f"{ours}.{part}"] = own(r.take(f"{theirs}.{part}"))
    if spec.tied:
        r.take_tied("cls.predictions.decoder.weight", c["tok_emb"])
        c["mlm.bias"] = own(r.take("cls.predictions.bias"))
        r.take_tied("cls.predictions.decoder.bias", c["mlm.bias"])
    else:
        c["head.weight"] = own(r.take("cls.predictions.decoder.weight"))
        # forward uses decoder.bias; cls.predictions.bias is then a dead parameter.
        live = "cls.predictions.decoder.bias" if r.has("cls.predictions.decoder.bias") else "cls.predictions.bias"
        c["mlm.bias"] = own(r.take(live))
        if r.has("cls.predictions.bias"):
            r.take("cls.predictions.bias")
    r.finish()
    return c


def from_canonical(spec: ModelSpec, c: dict, consume: bool = False) -> dict:
    take = c.pop if consume else c.__getitem__  # the HF tensors are the canonical ones: no copies
    sd = {PREFIX + theirs: c[ours] for ours, theirs in _EMB.items()}
    for i in range(spec.layers):
        for ours, theirs in _PER_LAYER.items():
            for part in ("weight", "bias"):
                sd[f"{PREFIX}encoder.layer.{i}.{theirs}.{part}"] = take(f"layers.{i}.{ours}.{part}")
    for ours, theirs in _MLM.items():
        for part in ("weight", "bias"):
            sd[f"{theirs}.{part}"] = c[f"{ours}.{part}"]
    sd["cls.predictions.bias"] = c["mlm.bias"]
    sd["cls.predictions.decoder.weight"] = c["tok_emb"] if spec.tied else c["head.weight"]
    sd["cls.predictions.decoder.bias"] = c["mlm.bias"]
    return sd
