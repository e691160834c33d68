"""GPT-2 (GPT2LMHeadModel) <-> canonical.

GPT-2 stores its linears as Conv1D, whose weight is [in, out] (the transpose of nn.Linear), and
fuses q/k/v into one c_attn of width 3*D. Canonical wants nn.Linear's [out, in] and split q/k/v,
so weights are transposed and c_attn is cut in three on the way in, and undone on the way out.
"""
from __future__ import annotations

import torch

from .canonical import HFReader, own
from .spec import ModelSpec

PREFIX = "transformer."
# Older checkpoints saved the causal-mask buffers attn.bias / attn.masked_bias; they hold no weights.
IGNORE = (r"(^|\.)h\.\d+\.attn\.(masked_)?bias$",)

_NORMS = {"attn_norm": "ln_1", "mlp_norm": "ln_2"}
_LINEARS = {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}


def to_canonical(spec: ModelSpec, hf_state_dict: dict) -> dict:
    r = HFReader("gpt2", hf_state_dict, PREFIX, head_prefixes=("lm_head.",), ignore=IGNORE)
    D = spec.hidden
    c = {"tok_emb": own(r.take(PREFIX + "wte.weight")), "pos_emb": own(r.take(PREFIX + "wpe.weight"))}
    for i in range(spec.layers):
        h, p = f"{PREFIX}h.{i}.", f"layers.{i}."
        for ours, theirs in _NORMS.items():
            for part in ("weight", "bias"):
                c[f"{p}{ours}.{part}"] = own(r.take(f"{h}{theirs}.{part}"))
        qkv_w, qkv_b = r.take(h + "attn.c_attn.weight"), r.take(h + "attn.c_attn.bias")
        for j, name in enumerate("qkv"):
            c[f"{p}{name}.weight"] = own(qkv_w[:, j * D:(j + 1) * D].t())
            c[f"{p}{name}.bias"] = own(qkv_b[j * D:(j + 1) * D])
        for ours, theirs in _LINEARS.items():
            c[f"{p}{ours}.weight"] = own(r.take(f"{h}{theirs}.weight").t())
            c[f"{p}{ours}.bias"] = own(r.take(f"{h}{theirs}.bias"))
    c["final_norm.weight"] = own(r.take(PREFIX + "ln_f.weight"))
    c["final_norm.bias"] = own(r.take(PREFIX + "ln_f.bias"))
    if spec.tied:
        r.take_tied("lm_head.weight", c["tok_emb"])
    else:
        c["head.weight"] = own(r.take("lm_head.weight"))
    r.finish()
    return c


def from_canonical(spec: ModelSpec, c: dict, consume: bool = False) -> dict:
    # The Conv1D weights are copies (transposed, q/k/v fused). consume=True pops each layer tensor
    # from `c` as it is converted, so a canonical tensor dies as soon as its copy exists: one
    # layer's worth alive instead of two (grown layers streamed into a sharded engine).
    take = c.pop if consume else c.__getitem__
    sd = {PREFIX + "wte.weight": c["tok_emb"], PREFIX + "wpe.weight": c["pos_emb"]}
    for i in range(spec.layers):
        h, p = f"{PREFIX}h.{i}.", f"layers.{i}."
        for ours, theirs in _NORMS.items():
            for part in ("weight", "bias"):
                sd[f"{h}{theirs}.{part}"] = take(f"{p}{ours}.{part}")
        # cat of the transposes is [in, 3*out] and contiguous already: one copy, not two.
        sd[h + "attn.c_attn.weight"] = torch.cat([take(f"{p}{n}.weight").t() for n in "qkv"], 1)
        sd[h + "attn.c_attn.bias"] = torch.cat([take(f"{p}{n}.bias") for n in "qkv"], 0)
        for ours, theirs in _LINEARS.items():
            sd[f"{h}{theirs}.weight"] = take(f"{p}{ours}.weight").t().contiguous()
            sd[f"{h}{theirs}.bias"] = take(f"{p}{ours}.bias")
    sd[PREFIX + "ln_f.weight"] = c["final_norm.weight"]
    sd[PREFIX + "ln_f.bias"] = c["final_norm.bias"]
    sd["lm_head.weight"] = c["tok_emb"] if spec.tied else c["head.weight"]
    return sd
