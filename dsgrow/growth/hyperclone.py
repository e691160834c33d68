"""HyperCloning (Samragh et al., Apple 2024): function-preserving width growth by integer multiples.

Every axis is tiled: new unit i is old unit ``i mod n1`` (whole heads for attention, GQA groups
kept), and a tensor reading a tiled axis divides by the multiple, so ``W' = kron(1_{k_out x
k_in}, W) / k_in``. With even tiling every LayerNorm/RMSNorm sees its input's exact mean and
variance, so the grown model computes the small model's logits exactly (the paper's point).

Optional `noise` breaks the symmetry between clones without changing the function (the paper's
noise, growth/symmetry.py): zero-sum noise across the clones of each input unit of every tensor
that reads a cloned axis, std ``noise * std(W)`` per tensor.
"""
from __future__ import annotations

from ..families import ModelSpec
from .depth import FixedGrowth, make_plan
from .net2net import fpi_maps


def hyperclone_growth(small: ModelSpec, canonical: dict, large: ModelSpec, noise: float = 0.0,
                      depth: str = "identity", seed: int = 0) -> FixedGrowth:
    """One large layer at a time (the noise too: each tensor has its own seeded generator)."""
    from ..families import norm_position

    plan = make_plan(depth, small.layers, large.layers, norm_position(small) == "post")
    return FixedGrowth(small, canonical, large, fpi_maps(small, large, "even", seed), plan, noise=noise,
                       noise_seed=seed)


def hyperclone(small: ModelSpec, canonical: dict, large: ModelSpec, noise: float = 0.0, depth: str = "identity",
               seed: int = 0) -> dict:
    """HyperCloning width (integer multiples, tiled) with the chosen depth map and optional noise."""
    return hyperclone_growth(small, canonical, large, noise, depth, seed).all()


__all__ = ["hyperclone", "hyperclone_growth"]
