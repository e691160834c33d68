"""Symmetry breaking for copy-based width growth, without changing the function.

A copy map (Net2Net/FPI, HyperCloning, the width part of stacking and interpolation) starts every
new unit equal to the old unit it copies. With dropout 0, the copies see identical gradients and
an elementwise optimizer (Adam) keeps them bitwise equal forever: the large model then trains as
the small-width one while paying the large model's FLOPs. Each paper breaks the symmetry (Net2Net
and HyperCloning add noise, G_stack ~20% noise on the copy, bert2BERT uses AKI).

`noise` here is HyperCloning's function-preserving form: every tensor that *reads* a copied axis
gets noise that sums to zero over the copies of each old unit. The copies carry equal values, so
the noise cancels in the sum (exact in real arithmetic, ~1e-7 relative in fp32), yet each copy's
reader weights now differ, so the copies' gradients (and then the copies) differ. Its standard
deviation is ``noise * std`` of the tensor (of the copied source layer where the tensor is zero,
as in Net2Net's identity layers, whose residual writers start at zero).

Each tensor's noise comes from its own generator, seeded by (seed, tensor name): a large layer
made alone (a sharded write, one layer at a time) gets the same noise as in the whole model.
"""
from __future__ import annotations

import zlib

import torch

from .ops import GLOBAL_ROLES, LAYER_ROLES


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()) + (int(seed) << 32))


def zero_sum_noise(t: torch.Tensor, dim: int, groups: torch.Tensor, n_groups: int, scale: float,
                   g: torch.Generator) -> torch.Tensor:
    """t + scale * noise along `dim`, where the noise of the rows sharing a group sums to zero."""
    noise = torch.randn(t.shape, generator=g, dtype=torch.float64)
    x = noise.movedim(dim, 0)
    mean = torch.zeros((n_groups,) + x.shape[1:], dtype=torch.float64).index_add_(0, groups, x)
    count = torch.bincount(groups, minlength=n_groups).to(torch.float64).reshape((-1,) + (1,) * (x.dim() - 1))
    x = x - (mean / count)[groups]
    return t + (scale * x.movedim(0, dim)).to(device=t.device, dtype=t.dtype)  # a fitted LiGO may be on a GPU


def _std(t: torch.Tensor) -> float:
    return float(t.double().std()) if t.numel() > 1 else 0.0


def break_symmetry(key: str, t: torch.Tensor, maps: dict, noise: float, seed: int,
                   fallback: torch.Tensor | None = None, ref: torch.Tensor | None = None) -> torch.Tensor:
    """Canonical tensor `key` with zero-sum noise over the copies of every axis it reads.

    `fallback` gives the scale where `t` itself is all zeros (an identity layer's writer); `ref`,
    when given, always gives it (a fitted LiGO scales by the copied source tensor, see ligo.py)."""
    if not noise:
        return t
    roles = LAYER_ROLES[key.split(".", 2)[2]] if key.startswith("layers.") else GLOBAL_ROLES[key]
    g = _generator(seed, key)
    for dim, role in enumerate(roles):
        if not (isinstance(role, tuple) and role[1] == "in"):
            continue
        m = maps[role[0]]
        if int(m.counts.max()) < 2:
            continue  # nothing copied on this axis
        if ref is not None:
            std = _std(ref)
        else:
            std = _std(t) or (_std(fallback) if fallback is not None else 0.0)
        t = zero_sum_noise(t, dim, m.rows(), m.n1 * m.unit, noise * std, g)
    return t


__all__ = ["break_symmetry", "zero_sum_noise"]
