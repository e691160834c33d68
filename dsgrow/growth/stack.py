"""Depth stacking: StackBERT (Gong et al. 2019: copy the whole stack on top, doubling depth),
G_stack (Du et al., NeurIPS 2024: the stack repeated k times) and interleaving (each layer
repeated k times in place). Width, if it grows too, is grown with FPI copies (net2net.fpi).

Not function preserving: a copied layer adds its residual update a second time.
"""
from __future__ import annotations

from ..families import ModelSpec
from .depth import FixedGrowth, interleave_plan, stack_plan
from .net2net import fpi_maps
from .ops import GrowthError


def stack_growth(small: ModelSpec, canonical: dict, large: ModelSpec, mode: str = "stack", select: str = "even",
                 seed: int = 0, noise: float = 0.0) -> FixedGrowth:
    if mode not in ("stack", "interleave"):
        raise GrowthError(f"stack: mode must be 'stack' or 'interleave', got {mode!r}")
    plan = (stack_plan if mode == "stack" else interleave_plan)(small.layers, large.layers)
    return FixedGrowth(small, canonical, large, fpi_maps(small, large, select, seed), plan, noise=noise,
                       noise_seed=seed)


def stack(small: ModelSpec, canonical: dict, large: ModelSpec, mode: str = "stack", select: str = "even",
          seed: int = 0, noise: float = 0.0) -> dict:
    """Layers repeated L2 / L1 times: ``mode="stack"`` [0..L1-1, 0..L1-1, ...] or ``"interleave"``
    [0, 0, 1, 1, ...]. `noise` > 0 breaks the width copies' symmetry (growth/symmetry.py; G_stack
    found noise on the copy helped)."""
    return stack_growth(small, canonical, large, mode, select, seed, noise).all()


__all__ = ["stack", "stack_growth"]
