"""Run an HF GPT-2 / LLaMA model as one of its subnetworks: layers skipped, attention heads and MLP
neurons sliced out of the matmuls.

The saving is real compute, not a mask: a sliced linear multiplies by `weight[idx]` (rows of the
heads / neurons kept), so its matmul is as small as the subnetwork, and a skipped block's forward
is never called. The slicing lives in the *leaf* modules' forwards (installed once per model,
switched per step): DeepSpeed ZeRO-3 gathers a module's parameters in hooks around that module's
own call, so every matmul must still go through its module's `__call__`. A skipped block is never
called, so ZeRO-3 never gathers its shards; a sliced linear's parameter is gathered whole (ZeRO-3
partitions flat parameters, not heads: slicing a gathered weight is the only way).

With no sample set (`clear`), every patched forward takes the module's original code path: the
full model is bitwise the model before `install`.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ..families.spec import ModelSpec

FAMILIES = ("gpt2", "llama")


class SubnetError(ValueError):
    """A subnetwork request that cannot run (one-line message)."""


@dataclass
class Sample:
    """One step's subnetwork: which blocks run, and in each running block which heads and MLP
    neurons (sorted index tensors; None = all). `head_scale` / `ffn_scale` multiply the attention
    and MLP outputs (1 / kept fraction: the kept units stand in for the whole, as in dropout)."""

    layers: list
    heads: dict = field(default_factory=dict)
    neurons: dict = field(default_factory=dict)
    head_scale: float = 1.0
    ffn_scale: float = 1.0

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "heads": {k: v.tolist() for k, v in self.heads.items()},
                "neurons": {k: v.tolist() for k, v in self.neurons.items()},
                "head_scale": self.head_scale, "ffn_scale": self.ffn_scale}


def _set(mod: torch.nn.Module, rows=None, cols=None, scale: float = 1.0) -> None:
    mod._dsgrow_rows, mod._dsgrow_cols, mod._dsgrow_scale = rows, cols, scale


def _linear_forward(self, x):
    """nn.Linear (weight [out, in]) with output rows and / or input columns cut."""
    rows, cols = self._dsgrow_rows, self._dsgrow_cols
    if rows is None and cols is None:
        return self._dsgrow_orig(x)
    w, b = self.weight, self.bias
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols)
        out = F.linear(x, w)
        if self._dsgrow_scale != 1.0:
            out = out * self._dsgrow_scale
        return out + b if b is not None else out
    return F.linear(x, w, b)


def _conv1d_forward(self, x):
    """GPT-2's Conv1D (weight [in, out], out = bias + x @ weight) with output columns and / or
    input rows cut (its weight is the transpose of nn.Linear's)."""
    rows, cols = self._dsgrow_rows, self._dsgrow_cols
    if rows is None and cols is None:
        return self._dsgrow_orig(x)
    w, b = self.weight, self.bias
    if rows is not None:
        w, b = w.index_select(1, rows), b.index_select(0, rows)
    if cols is not None:
        w = w.index_select(0, cols)
    x2 = x.reshape(-1, x.size(-1))
    out = torch.addmm(b, x2, w, alpha=self._dsgrow_scale)
    return out.view(*x.shape[:-1], w.size(1))


def _block_forward(self, hidden_states, *args, **kwargs):
    """A decoder block that, when skipped, passes the residual stream through untouched (its
    modules are never called: no compute, and no ZeRO-3 gather of its shards)."""
    if self._dsgrow_skip:
        return hidden_states
    return self._dsgrow_orig(hidden_states, *args, **kwargs)


def _patch(mod: torch.nn.Module, fn) -> None:
    if not hasattr(mod, "_dsgrow_orig"):
        mod._dsgrow_orig = mod.forward
        mod.forward = types.MethodType(fn, mod)


def _is_conv1d(mod) -> bool:
    return type(mod).__name__ == "Conv1D"


class SlicedModel:
    """The patched model: `apply(sample)` before a step's forwards, `clear()` for the full model."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
        if spec.family not in FAMILIES:
            raise SubnetError(f"subnetwork training: family {spec.family!r} is not supported (gpt2, llama)")
        self.model, self.spec = model, spec
        base = getattr(model, model.base_model_prefix, model)
        blocks = base.h if spec.family == "gpt2" else base.layers
        if len(blocks) != spec.layers:
            raise SubnetError(f"subnetwork training: the model has {len(blocks)} blocks, the spec {spec.layers}")
        self.blocks = list(blocks)
        for blk in self.blocks:
            _patch(blk, _block_forward)
            blk._dsgrow_skip = False
            for lin in self._linears(blk):
                _patch(lin, _conv1d_forward if _is_conv1d(lin) else _linear_forward)
                _set(lin)
        self.sample: Optional[Sample] = None

    def _linears(self, blk) -> list:
        if self.spec.family == "gpt2":
            return [blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj]
        a, m = blk.self_attn, blk.mlp
        return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]

    def clear(self) -> None:
        """Back to the full model (evaluation, export, the full-model phase)."""
        self.sample = None
        for blk in self.blocks:
            blk._dsgrow_skip = False
            for lin in self._linears(blk):
                _set(lin)
            if self.spec.family == "gpt2":
                blk.attn.split_size = self.spec.hidden

    def apply(self, sample: Sample) -> None:
        self.clear()
        self.sample = sample
        keep = set(sample.layers)
        hd = self.spec.head_dim
        for i, blk in enumerate(self.blocks):
            if i not in keep:
                blk._dsgrow_skip = True
                continue
            heads, neurons = sample.heads.get(i), sample.neurons.get(i)
            if heads is not None:
                self._slice_heads(blk, heads, hd, sample.head_scale)
            if neurons is not None:
                self._slice_neurons(blk, neurons, sample.ffn_scale)

    def _slice_heads(self, blk, heads: torch.Tensor, hd: int, scale: float) -> None:
        dev = blk.attn.c_attn.weight.device if self.spec.family == "gpt2" else blk.self_attn.q_proj.weight.device
        cols = (heads.to(dev)[:, None] * hd + torch.arange(hd, device=dev)).reshape(-1)  # the heads' features
        if self.spec.family == "gpt2":
            D = self.spec.hidden
            _set(blk.attn.c_attn, rows=torch.cat([cols, cols + D, cols + 2 * D]))  # q, k, v
            _set(blk.attn.c_proj, cols=cols, scale=scale)
            blk.attn.split_size = cols.numel()  # HF splits c_attn's output in three of this width
            return
        a = blk.self_attn
        group = self.spec.heads // self.spec.n_kv_heads
        kv = torch.unique(heads // group)  # heads come in whole kv groups (sampler's guarantee)
        kv_cols = (kv.to(dev)[:, None] * hd + torch.arange(hd, device=dev)).reshape(-1)
        _set(a.q_proj, rows=cols)
        _set(a.k_proj, rows=kv_cols)
        _set(a.v_proj, rows=kv_cols)
        _set(a.o_proj, cols=cols, scale=scale)

    def _slice_neurons(self, blk, neurons: torch.Tensor, scale: float) -> None:
        if self.spec.family == "gpt2":
            n = neurons.to(blk.mlp.c_fc.weight.device)
            _set(blk.mlp.c_fc, rows=n)
            _set(blk.mlp.c_proj, cols=n, scale=scale)
            return
        m = blk.mlp
        n = neurons.to(m.up_proj.weight.device)
        _set(m.gate_proj, rows=n)
        _set(m.up_proj, rows=n)
        _set(m.down_proj, cols=n, scale=scale)
