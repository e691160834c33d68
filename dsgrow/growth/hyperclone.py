"""HyperCloning (Samragh et al., Apple 2024): function-preserving width growth by integer multiples.

Every axis is tiled: new unit i is old unit ``i mod n1`` (whole heads for attention, GQA groups
kept), and a tensor reading a tiled axis divides by the multiple, so ``W' = kron(1_{k_out x
k_in}, W) / k_in``. With even tiling every LayerNorm/RMSNorm sees its input's exact mean and
variance, so the grown model computes the small model's logits exactly (the paper's point).

Optional `noise` breaks the symmetry between clones without changing the function: for every
weight that reads a cloned axis, zero-sum noise is added across the clones of each input unit;
the clones carry equal values, so the noise cancels in the sum (exact in real arithmetic, ~1e-7
relative in fp32). Noise std is ``noise * std(W)`` per tensor.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..families import ModelSpec
from .depth import FixedGrowth, make_plan
from .net2net import fpi_maps
from .ops import GLOBAL_ROLES, LAYER_ROLES


def _zero_sum_noise(t: torch.Tensor, dim: int, groups: torch.Tensor, n_groups: int, scale: float,
                    g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(t.shape, generator=g, dtype=torch.float64)
    x = noise.movedim(dim, 0)
    mean = torch.zeros((n_groups,) + x.shape[1:], dtype=torch.float64).index_add_(0, groups, x)
    count = torch.bincount(groups, minlength=n_groups).to(torch.float64).reshape((-1,) + (1,) * (x.dim() - 1))
    x = x - (mean / count)[groups]
    return t + (scale * x.movedim(0, dim)).to(t.dtype)


def _growth(small: ModelSpec, canonical: dict, large: ModelSpec, depth: str, seed: int) -> FixedGrowth:
    from ..families import norm_position

    plan = make_plan(depth, small.layers, large.layers, norm_position(small) == "post")
    return FixedGrowth(small, canonical, large, fpi_maps(small, large, "even", seed), plan)


def hyperclone_growth(small: ModelSpec, canonical: dict, large: ModelSpec, noise: float = 0.0,
                      depth: str = "identity", seed: int = 0) -> Optional[FixedGrowth]:
    """One large layer at a time; None with noise (drawn over the whole model in one sequence)."""
    return None if noise else _growth(small, canonical, large, depth, seed)


def hyperclone(small: ModelSpec, canonical: dict, large: ModelSpec, noise: float = 0.0, depth: str = "identity",
               seed: int = 0) -> dict:
    """HyperCloning width (integer multiples, tiled) with the chosen depth map and optional noise."""
    fixed = _growth(small, canonical, large, depth, seed)
    out = fixed.all()
    if not noise:
        return out
    maps = fixed.maps
    g = torch.Generator().manual_seed(seed + 1)
    for key, t in out.items():
        roles = LAYER_ROLES[key.split(".", 2)[2]] if key.startswith("layers.") else GLOBAL_ROLES[key]
        for dim, role in enumerate(roles):
            if isinstance(role, tuple) and role[1] == "in":
                m = maps[role[0]]
                rows = (m.idx[:, None] * m.unit + torch.arange(m.unit)).reshape(-1)
                std = float(t.std()) if t.numel() > 1 else 0.0
                out[key] = _zero_sum_noise(out[key], dim, rows, m.n1 * m.unit, noise * std, g)
    return out


__all__ = ["hyperclone", "hyperclone_growth"]
