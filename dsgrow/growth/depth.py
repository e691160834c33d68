"""Fixed depth maps (L1 -> L2 layers) as mixing matrices: stacking, interleaving, interpolation and
Net2Net identity layers. LiGO learns the same kind of matrices (`ligo.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch

from .ops import (RESIDUAL_WRITERS, GrowthError, join_layers, mix_one_layer, split_layers, widen_global,
                  widen_layer)
from .symmetry import break_symmetry

DEPTH_KINDS = ("identity", "stack", "interleave", "interpolate")


@dataclasses.dataclass
class DepthPlan:
    """Which small layer(s) each large layer is made of.

    Large layer l is ``(1 - alpha[l]) * small[src[l]] + alpha[l] * small[src2[l]]`` (alpha 0 when
    absent). `identity[l]` marks a new Net2Net identity layer: its residual writers (o, down and
    their biases) are zero. `norm_handoff[l]` (post-LN only) sets large layer l's mlp_norm to the
    identity norm (gain 1, bias 0) because the identity layer after it takes its affine over.
    """

    src: list
    src2: Optional[list] = None
    alpha: Optional[list] = None
    identity: Optional[list] = None
    norm_handoff: Optional[list] = None

    @property
    def L2(self) -> int:
        return len(self.src)

    def matrices(self, names: Iterable[str], L1: int, post_ln: bool) -> tuple[dict, Optional[dict]]:
        """(``{name: [L2, L1]}``, identity-norm coefficients ``{norm weight name: [L2]}`` or None)."""
        L2 = self.L2
        base = torch.zeros(L2, L1, dtype=torch.float64)
        for l, j in enumerate(self.src):
            a = self.alpha[l] if self.alpha is not None else 0.0
            base[l, j] += 1.0 - a
            if a:
                base[l, self.src2[l]] += a
        w = {s: base.clone() for s in names}
        if not any(self.identity or ()):
            return w, None
        ident = {"attn_norm.weight": torch.zeros(L2, dtype=torch.float64),
                 "mlp_norm.weight": torch.zeros(L2, dtype=torch.float64)}
        for l, new in enumerate(self.identity):
            if not new:
                continue
            for s in RESIDUAL_WRITERS:
                if s in w:
                    w[s][l] = 0.0
            if post_ln:
                _set_identity_norm(w, ident, l, "attn_norm")
        if post_ln:
            for l, handoff in enumerate(self.norm_handoff or ()):
                if handoff:
                    _set_identity_norm(w, ident, l, "mlp_norm")
        return w, (ident if post_ln else None)


def _set_identity_norm(w: dict, ident: dict, l: int, norm: str) -> None:
    for part in ("weight", "bias"):
        if f"{norm}.{part}" in w:
            w[f"{norm}.{part}"][l] = 0.0
    ident[f"{norm}.weight"][l] = 1.0


def even_spread(L1: int, L2: int) -> list[int]:
    """New layers inserted after each of the L1 old layers: L2 - L1 in all, spread evenly."""
    n = L2 - L1
    return [(j + 1) * n // L1 - j * n // L1 for j in range(L1)]


def identity_plan(L1: int, L2: int, post_ln: bool) -> DepthPlan:
    """Net2Net deeper: the L1 layers in order with L2 - L1 identity layers spread between them.

    A new layer copies the layer before it, with o and down (and their biases) zeroed, so its
    internals are trained weights and gradients reach its residual writers. Pre-LN: the block is
    exactly x -> x. Post-LN (BERT) the block computes LN_mlp(LN_attn(x)) on the previous block's
    output g*n + b (n normalised). So the previous block's mlp_norm becomes (1, 0) and outputs n,
    the new block's attn_norm is (1, 0) (LN of the already normalised n is n, up to eps), and the
    last new block of a run takes the affine (g, b) over with its mlp_norm. Exact up to LayerNorm's
    eps acting on a unit-variance input (BERT's eps is 1e-12).
    """
    src, identity, handoff = [], [], []
    for j, extra in enumerate(even_spread(L1, L2)):
        src.append(j)
        identity.append(False)
        handoff.append(extra > 0)
        for e in range(extra):
            src.append(j)
            identity.append(True)
            handoff.append(e < extra - 1)
    return DepthPlan(src=src, identity=identity, norm_handoff=handoff if post_ln else None)


def stack_plan(L1: int, L2: int) -> DepthPlan:
    """StackBERT / G_stack: the whole stack repeated L2 / L1 times, bottom to top."""
    if L2 % L1:
        raise GrowthError(f"stacking grows layers by integer multiples only: {L1} -> {L2}")
    return DepthPlan(src=[l % L1 for l in range(L2)])


def interleave_plan(L1: int, L2: int) -> DepthPlan:
    """Every layer repeated L2 / L1 times in place: [0, 0, 1, 1, ...]."""
    if L2 % L1:
        raise GrowthError(f"interleaving grows layers by integer multiples only: {L1} -> {L2}")
    k = L2 // L1
    return DepthPlan(src=[l // k for l in range(L2)])


def interpolate_plan(L1: int, L2: int) -> DepthPlan:
    """Large layer l sits at depth t = l (L1-1)/(L2-1) of the small stack and is the linear
    interpolation of the two small layers around t (the first and last layers are kept)."""
    if L1 == 1 or L2 == 1:
        return DepthPlan(src=[0] * L2)
    src, src2, alpha = [], [], []
    for l in range(L2):
        t = l * (L1 - 1) / (L2 - 1)
        j = min(int(t), L1 - 2)
        src.append(j)
        src2.append(j + 1)
        alpha.append(t - j)
    return DepthPlan(src=src, src2=src2, alpha=alpha)


def make_plan(kind: str, L1: int, L2: int, post_ln: bool) -> DepthPlan:
    if kind == "identity":
        return identity_plan(L1, L2, post_ln)
    if kind == "stack":
        return stack_plan(L1, L2)
    if kind == "interleave":
        return interleave_plan(L1, L2)
    if kind == "interpolate":
        return interpolate_plan(L1, L2)
    raise GrowthError(f"depth must be one of {', '.join(DEPTH_KINDS)}, got {kind!r}")


class FixedGrowth:
    """A closed-form growth (width by `maps`, depth by `plan`), made one large layer at a time.

    Large layer l is mixed from only the small layers its plan row reads (one, two for
    interpolation), each widened when needed, so a sharded write holds about one large layer
    (growth.stream.LayerStream); `all()` is the whole canonical dict. Skipping the zero-weight
    terms of the mix leaves every value as it was (x + 0 * t = x; only the sign of a zero can
    differ).
    `widen_hook(j, widen) -> widened layer j` may rewrite a widened layer (AKI reads layer j + 1).
    `noise` > 0 breaks the copies' symmetry without changing the function (growth/symmetry.py),
    each tensor from its own seeded generator, so a layer made alone gets the same noise.
    """

    def __init__(self, small, canonical: dict, large, maps: dict, plan: DepthPlan, widen_hook=None,
                 noise: float = 0.0, noise_seed: int = 0):
        from ..families import norm_position

        self.small, self.large, self.maps, self.hook = small, large, maps, widen_hook
        self.noise, self.noise_seed = float(noise), int(noise_seed)
        self.layers, glob = split_layers(small, canonical)
        self.head_tied = "head.weight" not in glob
        self.glob = {k: break_symmetry(k, t, maps, self.noise, self.noise_seed)
                     for k, t in widen_global(glob, maps, self.head_tied).items()}
        self.w, self.ident = plan.matrices(self.layers[0].keys(), small.layers, norm_position(small) == "post")

    def _widen(self, j: int) -> dict:
        return widen_layer(self.layers[j], self.maps, self.head_tied)

    def widened(self, j: int) -> dict:
        return self._widen(j) if self.hook is None else self.hook(j, self._widen)

    def layer(self, l: int) -> dict:
        L1 = self.small.layers
        js = [j for j in range(L1) if any(float(m[l, j]) != 0.0 for m in self.w.values())] or [0]
        w = {s: m[:, js] for s, m in self.w.items()}
        if not self.noise:
            return mix_one_layer((self.widened(j) for j in js), w, l, self.ident, consume=True)
        widened = [self.widened(j) for j in js]
        layer = mix_one_layer(widened, w, l, self.ident)
        # The first source's widened tensor sets the noise scale where the mix is all zeros (an
        # identity layer's writers): its copies must be told apart too.
        return {s: break_symmetry(f"layers.{l}.{s}", t, self.maps, self.noise, self.noise_seed,
                                  fallback=widened[0][s]) for s, t in layer.items()}

    def all(self) -> dict:
        from ..families import canonical_keys

        return join_layers([self.layer(l) for l in range(self.large.layers)], self.glob, canonical_keys(self.large))
