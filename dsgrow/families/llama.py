"""LLaMA (LlamaForCausalLM) <-> canonical.

HF's LLaMA already uses nn.Linear with split q/k/v, so this is a renaming. q/k rows are kept in
HF's order: HF applies RoPE in the rotate_half convention (first half of each head's dims paired
with the second half), not the interleaved one of Meta's original checkpoints, and canonical
inherits that convention unchanged.
"""
from __future__ import annotations

from .canonical import HFReader, own
from .spec import ModelSpec

PREFIX = "model."
# rotary inv_freq was a persistent buffer in older transformers; it is recomputed from rope_theta.
IGNORE = (r"rotary_emb\.(original_)?inv_freq$",)

_PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "q.weight": "self_attn.q_proj.weight",
    "k.weight": "self_attn.k_proj.weight",
    "v.weight": "self_attn.v_proj.weight",
    "o.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "gate.weight": "mlp.gate_proj.weight",
    "up.weight": "mlp.up_proj.weight",
    "down.weight": "mlp.down_proj.weight",
}


def to_canonical(spec: ModelSpec, hf_state_dict: dict) -> dict:
    r = HFReader("llama", hf_state_dict, PREFIX, head_prefixes=("lm_head.",), ignore=IGNORE)
    c = {"tok_emb": own(r.take(PREFIX + "embed_tokens.weight"))}
    for i in range(spec.layers):
        for ours, theirs in _PER_LAYER.items():
            c[f"layers.{i}.{ours}"] = own(r.take(f"{PREFIX}layers.{i}.{theirs}"))
    c["final_norm.weight"] = own(r.take(PREFIX + "norm.weight"))
    if spec.tied:
        r.take_tied("lm_head.weight", c["tok_emb"])
    else:
        c["head.weight"] = own(r.take("lm_head.weight"))
    r.finish()
    return c


def from_canonical(spec: ModelSpec, c: dict, consume: bool = False) -> dict:
    take = c.pop if consume else c.__getitem__  # the HF tensors are the canonical ones: no copies
    sd = {PREFIX + "embed_tokens.weight": c["tok_emb"]}
    for i in range(spec.layers):
        for ours, theirs in _PER_LAYER.items():
            sd[f"{PREFIX}layers.{i}.{theirs}"] = take(f"layers.{i}.{ours}")
    sd[PREFIX + "norm.weight"] = c["final_norm.weight"]
    sd["lm_head.weight"] = c["tok_emb"] if spec.tied else c["head.weight"]
    return sd
