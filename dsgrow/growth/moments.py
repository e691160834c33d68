"""Adam moments across a function-preserving growth (`grow.optimizer: transfer`).

The copy operators (FPI with Net2Net identity layers, HyperCloning) map a small weight w_i to
large weights c_k * w_i (c_k = 1 for a copy, 1/n for a fan-in division), and the large model at
the grown point computes exactly what the small one computes. Each copy then carries the same
activations as its original, so the large gradient is a copy map of the small one as well, with
its own coefficients: g'_k = d_k * g_i with d_k = c_k / s_i, s_i = sum of c^2 over i's copies
(a copy on a fan-out axis shares the gradient n ways, d = 1/n; a fan-in division gets it whole,
d = 1). Staged training (Shen et al. 2022) halves and quarters its doubled moments for this
reason. So the moments the large model would have collected along the grown trajectory are
exactly

    m'_k = d_k m_i        v'_k = d_k^2 v_i,

and Adam's step count carries over (its bias correction belongs to the moments). A Net2Net
identity layer is new: its residual writers are zero, so its other tensors get no gradient at the
grown point, and all its moments start at zero ("zeros for new coordinates", as in MSG). Both
are checked against real gradients in tests/test_optimizer_transfer.py.

LiGO, stacking, AKI and interpolation mix or re-use weights without preserving the function, so
their large gradient is not a map of the small one; they reset the optimizer (as LiGO and G_stack
do). With uneven residual copies (FPI to a non-multiple width) the grown model is only close to
the small one, and so is the moment map.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..families import ModelSpec, norm_position
from .depth import identity_plan
from .net2net import fpi_maps
from .ops import GrowthError, split_layers, widen_global, widen_layer

def transfer_methods() -> tuple:
    """The registered methods whose moments have an exact image (registry `transfer`)."""
    from .registry import REGISTRY

    return tuple(n for n, m in REGISTRY.items() if m.transfer)


def check_transfer(small: ModelSpec, large: ModelSpec, method: str, opts: dict) -> None:
    """One-line GrowthError unless the moments of this growth have an exact image."""
    if small.mup:
        raise GrowthError("optimizer: transfer is not supported under muP (the moments would need the "
                          "readout's fold and the per-group LR change too); use optimizer: reset")
    if method not in transfer_methods():
        raise GrowthError(f"optimizer: transfer needs a function-preserving copy operator "
                          f"({', '.join(transfer_methods())}); {method} does not preserve the function, "
                          "so its gradients have no image of the small ones: use optimizer: reset")
    if opts.get("depth", "identity") != "identity":
        raise GrowthError(f"optimizer: transfer needs depth: identity (new layers that start as the "
                          f"identity), got depth: {opts['depth']}")
    if norm_position(small) != "pre":
        raise GrowthError(f"optimizer: transfer is implemented for pre-LN families (gpt2, llama), "
                          f"not {small.family}")


def _maps(small: ModelSpec, large: ModelSpec, method: str, opts: dict) -> dict:
    select = "even" if method == "hyperclone" else opts.get("select", "even")
    return fpi_maps(small, large, select, opts.get("seed", 0))


def _gram(fn, tensors: dict) -> dict:
    """s = T^T T 1 for a copy map T (`fn`), by one backward pass: the sum of squared coefficients
    over each small coordinate's copies."""
    ones = {k: torch.ones_like(t, dtype=torch.float64, requires_grad=True) for k, t in tensors.items()}
    out = fn(ones)
    torch.autograd.backward([out[k] for k in out], [out[k].detach() for k in out])
    return {k: ones[k].grad.to(torch.float32) for k in ones}


class MomentMap:
    """The large model's Adam moments, one large layer at a time (for growth.stream.LayerStream).

    `exp_avg`, `exp_avg_sq`: the small model's moments as canonical dicts (fp32)."""

    def __init__(self, small: ModelSpec, large: ModelSpec, method: str, opts: dict,
                 exp_avg: dict, exp_avg_sq: dict):
        check_transfer(small, large, method, opts)
        self.small, self.large = small, large
        self.maps = _maps(small, large, method, opts)
        self.head_tied = "head.weight" not in exp_avg
        self.plan = identity_plan(small.layers, large.layers, post_ln=False)
        m_layers, m_glob = split_layers(small, exp_avg)
        v_layers, v_glob = split_layers(small, exp_avg_sq)
        self.m_layers, self.v_layers = m_layers, v_layers
        self.s_layer = _gram(lambda t: widen_layer(t, self.maps, self.head_tied), m_layers[0])
        s_glob = _gram(lambda t: widen_global(t, self.maps, self.head_tied), m_glob)
        self.glob = {"exp_avg": self._first(m_glob, s_glob, widen_global),
                     "exp_avg_sq": self._second(v_glob, s_glob, widen_global)}

    def _first(self, m: dict, s: dict, widen) -> dict:
        return widen({k: m[k] / s[k] for k in m}, self.maps, self.head_tied)

    def _second(self, v: dict, s: dict, widen) -> dict:
        # (c_k sqrt(v_i) / s_i)^2 = d_k^2 v_i: a copy map applied to the RMS, then squared.
        root = widen({k: v[k].clamp_min(0).sqrt() / s[k] for k in v}, self.maps, self.head_tied)
        return {k: t.square() for k, t in root.items()}

    def layer(self, key: str, l: int) -> dict:
        """Large layer l's moments `key` ("exp_avg" or "exp_avg_sq") as {suffix: tensor}."""
        j = self.plan.src[l]
        if key == "exp_avg":
            out = self._first(self.m_layers[j], self.s_layer, widen_layer)
        else:
            out = self._second(self.v_layers[j], self.s_layer, widen_layer)
        if self.plan.identity[l]:  # a new layer: no moments yet
            out = {s: torch.zeros_like(t) for s, t in out.items()}
        return out


def moment_streams(small: ModelSpec, large: ModelSpec, method: str, opts: dict, exp_avg: dict,
                   exp_avg_sq: dict) -> dict:
    """{"exp_avg": LayerStream, "exp_avg_sq": LayerStream}: the large moments by HF name."""
    from .stream import LayerStream

    mm = MomentMap(small, large, method, opts, exp_avg, exp_avg_sq)
    return {key: LayerStream(large, mm.glob[key], lambda l, key=key: mm.layer(key, l))
            for key in ("exp_avg", "exp_avg_sq")}


def transfer_moments(small: ModelSpec, large: ModelSpec, method: str, opts: Optional[dict],
                     exp_avg: dict, exp_avg_sq: dict) -> dict:
    """The whole large model's moments as canonical dicts: {"exp_avg": {...}, "exp_avg_sq": {...}}."""
    from ..families import canonical_keys

    mm = MomentMap(small, large, method, opts or {}, exp_avg, exp_avg_sq)
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        d = dict(mm.glob[key])
        for l in range(large.layers):
            d.update({f"layers.{l}.{s}": t for s, t in mm.layer(key, l).items()})
        out[key] = {k: d[k] for k in canonical_keys(large)}
    return out


__all__ = ["transfer_methods", "check_transfer", "MomentMap", "moment_streams", "transfer_moments"]
