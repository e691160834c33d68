"""Depth by interpolation between neighbouring layers, for any L2 >= L1.

Large layer l sits at relative depth t = l (L1-1)/(L2-1) in the small stack and its weights are
the linear interpolation of the two small layers around t; the bottom and top layers are kept.
This is the weight-space counterpart of the interpolation/progressive-stacking baselines
(MSLT-style multi-stage growth); MSLT's other half, training only the new layers for a stage, is a
training schedule, not an operator, and is not done here. Width, if it grows, uses FPI copies.
Not function preserving.
"""
from __future__ import annotations

from ..families import ModelSpec
from .depth import FixedGrowth, interpolate_plan
from .net2net import fpi_maps


def interpolate_growth(small: ModelSpec, canonical: dict, large: ModelSpec, select: str = "even",
                       seed: int = 0, noise: float = 0.0) -> FixedGrowth:
    plan = interpolate_plan(small.layers, large.layers)
    return FixedGrowth(small, canonical, large, fpi_maps(small, large, select, seed), plan, noise=noise,
                       noise_seed=seed)


def interpolate(small: ModelSpec, canonical: dict, large: ModelSpec, select: str = "even", seed: int = 0,
                noise: float = 0.0) -> dict:
    """`noise` > 0 breaks the width copies' symmetry (growth/symmetry.py)."""
    return interpolate_growth(small, canonical, large, select, seed, noise).all()


__all__ = ["interpolate", "interpolate_growth"]
