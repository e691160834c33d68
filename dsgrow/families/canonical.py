"""The one transformer layout growth code works on, whatever the family.

A canonical model is a flat ``dict[str, torch.Tensor]`` plus its `ModelSpec`. Linear weights use
nn.Linear's ``[out_features, in_features]``; attention is always split into q/k/v; GQA shows up
only as k/v having ``kv_heads * head_dim`` rows. Keys (``layers.{i}.`` per block):

==================  =====================  ===========================================
key                 shape                  families
==================  =====================  ===========================================
tok_emb             [V, D]                 all
pos_emb             [P, D]                 gpt2, bert (learned positions)
type_emb            [2, D]                 bert
emb_norm.{w,b}      [D]                    bert (embedding LayerNorm)
attn_norm.weight    [D]                    all; ``.bias`` for gpt2/bert
q.weight            [H*hd, D]              all; ``q/k/v/o.bias`` for gpt2/bert
k.weight, v.weight  [KV*hd, D]             all
o.weight            [D, H*hd]              all
mlp_norm.weight     [D]                    all; ``.bias`` for gpt2/bert
gate.weight         [F, D]                 llama (SwiGLU: down(silu(gate x) * up x))
up.weight           [F, D]                 all; ``up.bias`` [F] for gpt2/bert
down.weight         [D, F]                 all; ``down.bias`` [D] for gpt2/bert
final_norm.weight   [D]                    gpt2, llama; ``.bias`` for gpt2
head.weight         [V, D]                 only when untied (tied: the head *is* tok_emb)
mlm.dense.{w,b}     [D, D], [D]            bert MLM head transform
mlm.norm.{w,b}      [D]                    bert
mlm.bias            [V]                    bert (the decoder's output bias)
==================  =====================  ===========================================

Norm placement differs (see `norm_position`): gpt2/llama are pre-LN (``attn_norm`` feeds
attention, ``mlp_norm`` feeds the MLP); BERT is post-LN (``attn_norm`` normalises the attention
residual sum, ``mlp_norm`` the MLP residual sum). llama norms are RMSNorm (weight only).

RoPE (llama): q/k rows stay in Hugging Face's order, i.e. within each head the first half of
``head_dim`` rotates against the second half (rotate_half). No interleave permutation is applied,
so growth code that mixes rows inside a head must keep the two halves paired.
"""
from __future__ import annotations

import importlib
import re
from typing import Iterable

import torch

from .spec import ModelSpec, SpecError

Canonical = dict  # dict[str, torch.Tensor]


def norm_position(spec: ModelSpec) -> str:
    """"post" for BERT (LayerNorm after each residual add), "pre" for gpt2/llama."""
    return "post" if spec.family == "bert" else "pre"


def canonical_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every canonical key of `spec` with its shape, in forward order."""
    if spec.vocab_size <= 0:
        raise SpecError("model.vocab_size is not set (it comes from the tokenizer)")
    V, D, F, P = spec.vocab_size, spec.hidden, spec.ffn_dim, spec.max_seq_len
    q_dim, kv_dim = spec.heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    biased = spec.family != "llama"  # gpt2/bert: biases and LayerNorm; llama: none and RMSNorm

    shapes: dict[str, tuple[int, ...]] = {"tok_emb": (V, D)}
    if spec.family in ("gpt2", "bert"):
        shapes["pos_emb"] = (P, D)
    if spec.family == "bert":
        shapes.update({"type_emb": (2, D), "emb_norm.weight": (D,), "emb_norm.bias": (D,)})

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        if biased:
            shapes[f"{name}.bias"] = (out_f,)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (D,)
        if biased:
            shapes[f"{name}.bias"] = (D,)

    for i in range(spec.layers):
        p = f"layers.{i}."
        pre = norm_position(spec) == "pre"
        if pre:
            norm(p + "attn_norm")
        linear(p + "q", q_dim, D)
        linear(p + "k", kv_dim, D)
        linear(p + "v", kv_dim, D)
        linear(p + "o", D, q_dim)
        norm(p + ("mlp_norm" if pre else "attn_norm"))
        if spec.family == "llama":
            linear(p + "gate", F, D)
        linear(p + "up", F, D)
        linear(p + "down", D, F)
        if not pre:
            norm(p + "mlp_norm")

    if spec.family in ("gpt2", "llama"):
        norm("final_norm")
    else:
        shapes.update({"mlm.dense.weight": (D, D), "mlm.dense.bias": (D,),
                       "mlm.norm.weight": (D,), "mlm.norm.bias": (D,)})
    if not spec.tied:
        shapes["head.weight"] = (V, D)
    if spec.family == "bert":
        shapes["mlm.bias"] = (V,)
    return shapes


def canonical_keys(spec: ModelSpec) -> list[str]:
    """The exact keys a canonical dict of `spec` has, in forward order."""
    return list(canonical_shapes(spec))


def validate_canonical(spec: ModelSpec, canonical: Canonical) -> None:
    """Raise `SpecError` (one line, naming the key) unless `canonical` has exactly spec's tensors."""
    shapes = canonical_shapes(spec)
    for key, shape in shapes.items():
        if key not in canonical:
            raise SpecError(f"canonical {spec.family}: missing tensor {key!r} (expected shape {list(shape)})")
        t = canonical[key]
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"canonical {spec.family}: {key!r} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != shape:
            raise SpecError(f"canonical {spec.family}: {key!r} has shape {list(t.shape)}, expected {list(shape)}")
    extra = [k for k in canonical if k not in shapes]
    if extra:
        raise SpecError(f"canonical {spec.family}: unexpected tensor {extra[0]!r}"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _family_module(spec: ModelSpec):
    # Imported lazily: the family modules import HFReader from here.
    return importlib.import_module(f".{spec.family}", __package__)


def to_canonical(spec: ModelSpec, hf_state_dict: dict) -> Canonical:
    """HF state dict of `spec`'s family -> canonical dict (fresh, contiguous tensors, input dtype).

    Accepts the dict of the *ForCausalLM / *ForMaskedLM model or of its bare base model (keys without
    the ``transformer.`` / ``model.`` / ``bert.`` prefix), with or without the tied head copy, and
    drops buffers older checkpoints saved (position_ids, rotary inv_freq, GPT-2's causal mask).
    An HF key the family does not know raises `SpecError`, so nothing is silently lost.
    """
    canonical = _family_module(spec).to_canonical(spec, hf_state_dict)
    validate_canonical(spec, canonical)
    return {k: canonical[k] for k in canonical_keys(spec)}  # forward order, as canonical_keys


def from_canonical(spec: ModelSpec, canonical: Canonical, consume: bool = False) -> dict:
    """Canonical dict -> the state dict `build_hf_model(spec).load_state_dict(sd, strict=True)` takes.

    Tied heads are emitted as the same tensor under both names (the model's state_dict lists both).
    Non-persistent buffers (position_ids, rotary inv_freq) are not emitted: the model builds them.
    consume=True: the caller gives `canonical` up; per-layer tensors are removed from it as they
    are converted, so a family that copies (GPT-2) never holds a layer twice.
    """
    validate_canonical(spec, canonical)
    return _family_module(spec).from_canonical(spec, canonical, consume=consume)


def own(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous copy: canonical tensors never alias the HF tensors they came from."""
    return t.detach().clone(memory_format=torch.contiguous_format)


class HFReader:
    """Hands out HF tensors by name and reports the ones nobody asked for.

    `prefix` is the base model's prefix; a dict with no key under it (a bare base model) gets it
    added to every key not under one of `head_prefixes`. Keys matching an `ignore` regex are buffers
    or heads dsgrow does not model and are dropped.
    """

    def __init__(self, family: str, sd: dict, prefix: str, head_prefixes: Iterable[str] = (),
                 ignore: Iterable[str] = ()):
        self.family = family
        head_prefixes = tuple(head_prefixes)
        if sd and not any(k.startswith(prefix) for k in sd):
            sd = {(k if k.startswith(head_prefixes) else prefix + k): v for k, v in sd.items()}
        patterns = [re.compile(p) for p in ignore]
        self.sd = {k: v for k, v in sd.items() if not any(p.search(k) for p in patterns)}
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise SpecError(f"{self.family} state dict: missing {key!r}")
        self.used.add(key)
        return self.sd[key]

    def take_tied(self, key: str, same_as: torch.Tensor) -> None:
        """Consume an optional copy of a tied tensor, refusing one that is not actually tied."""
        if key in self.sd:
            if not torch.equal(self.take(key), same_as):
                raise SpecError(f"{self.family} state dict: {key!r} differs from the tensor it is tied to "
                                "(the spec says tied; set model.tie_embeddings: false)")

    def finish(self) -> None:
        left = [k for k in self.sd if k not in self.used]
        if left:
            raise SpecError(f"{self.family} state dict: unexpected key {left[0]!r}"
                            + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))
