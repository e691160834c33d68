"""Net2Net / bert2BERT width growth (FPI, AKI) and Net2Net identity depth, on the canonical layout.

FPI (function-preserving initialisation): every new unit (residual coordinate, MLP neuron,
attention head) copies an old one; a tensor that *reads* a grown axis divides by the copy count
(fan-in division), so it computes the same sums. Net2Net's deeper operator is ``depth="identity"``
(the default; depth.identity_plan): new layers are copies of the layer before them with their
residual writers zeroed.

What is exact (fp32, checked by tests/test_growth.py):
* MLP width and head count (any sizes; GQA when each old kv group gets enough new kv heads):
  copies and fan-in division commute with GELU/SiLU and with per-head softmax.
* Residual width: a LayerNorm/RMSNorm over the grown stream sees the same mean and variance only
  when every coordinate has the same number of copies, i.e. ``select="even"`` and an integer
  multiple. With uneven copies (counts c_i) the grown model is exactly the small model in which
  every norm takes its mean and variance with weights c_i / D2 instead of 1 / D1; nothing else
  changes, but that is enough to move the logits (0.2-0.6 on the random test models at 1.5x).
* Tied heads: the head is the grown token embedding, whose columns are copies; the vector feeding
  it (final_norm, or BERT's mlm.norm) is grown with fan-in division instead (see ops.GLOBAL_ROLES).
* Depth: exact for pre-LN (gpt2, llama); for post-LN BERT exact up to LayerNorm's eps (see
  depth.identity_plan).
"""
from __future__ import annotations

import torch

from ..families import ModelSpec
from .depth import FixedGrowth, make_plan
from .ops import LAYER_ROLES, SelectMap, selection_maps


def fpi_maps(small: ModelSpec, large: ModelSpec, select: str = "even", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return selection_maps(small, large, select, g)


def fpi_growth(small: ModelSpec, canonical: dict, large: ModelSpec, select: str = "even", depth: str = "identity",
               seed: int = 0, noise: float = 0.0) -> FixedGrowth:
    from ..families import norm_position

    plan = make_plan(depth, small.layers, large.layers, norm_position(small) == "post")
    return FixedGrowth(small, canonical, large, fpi_maps(small, large, select, seed), plan, noise=noise,
                       noise_seed=seed)


def fpi(small: ModelSpec, canonical: dict, large: ModelSpec, select: str = "even", depth: str = "identity",
        seed: int = 0, noise: float = 0.0) -> dict:
    """bert2BERT's FPI (Net2Net width) with the chosen depth map; `noise` > 0 breaks the copies'
    symmetry as Net2Net recommends, in the function-preserving zero-sum form (growth/symmetry.py)."""
    return fpi_growth(small, canonical, large, select, depth, seed, noise).all()


def _first_copy_mask(m: SelectMap) -> torch.Tensor:
    """Rows (in units of m.unit) that are the first copy of their old unit."""
    first = torch.zeros(m.n2, dtype=torch.bool)
    seen = set()
    for i, j in enumerate(m.idx.tolist()):
        if j not in seen:
            seen.add(j)
            first[i] = True
    return first.repeat_interleave(m.unit)


def aki_growth(small: ModelSpec, canonical: dict, large: ModelSpec, select: str = "even", depth: str = "stack",
               seed: int = 0, noise: float = 0.0) -> FixedGrowth:
    from ..families import norm_position

    maps = fpi_maps(small, large, select, seed)
    keep = {axis: _first_copy_mask(m) for axis, m in maps.items()}

    def mix_next(j: int, widen) -> dict:
        layer = widen(j)
        if j + 1 == small.layers:  # the top layer keeps its own
            return layer
        nxt = widen(j + 1)
        mixed = {}
        for s, t in layer.items():
            axis = LAYER_ROLES[s][0][0]
            shape = [-1] + [1] * (t.dim() - 1)
            mixed[s] = torch.where(keep[axis].reshape(shape), t, nxt[s])
        return mixed

    plan = make_plan(depth, small.layers, large.layers, norm_position(small) == "post")
    return FixedGrowth(small, canonical, large, maps, plan, widen_hook=mix_next, noise=noise, noise_seed=seed)


def aki(small: ModelSpec, canonical: dict, large: ModelSpec, select: str = "even", depth: str = "stack",
        seed: int = 0, noise: float = 0.0) -> dict:
    """bert2BERT's AKI: FPI, except that every *new* output unit of layer j takes its weights from
    layer j + 1 (the top layer keeps its own). Not function preserving by design: the copies stop
    being identical, which breaks the symmetry FPI leaves between a unit and its copies, except in
    the top layer (it has no layer above): its MLP and head copies stay twins unless `noise` > 0."""
    return aki_growth(small, canonical, large, select, depth, seed, noise).all()


__all__ = ["fpi", "aki", "fpi_maps", "fpi_growth", "aki_growth"]
