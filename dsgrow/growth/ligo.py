"""LiGO (Wang et al., ICLR 2023): the large model as a learned linear map of the small one.

``Theta_large = L_depth R_width Theta_small``. Width first: small layer j's tensors are grown by
``W' = B W A^T`` with the paper's tying (sec. 3.3):

* one residual map ``B_emb`` [D2, D1] for everything on the residual stream: token/position/type
  embeddings, every norm, the outputs of o and down, the inputs of q/k/v/up/gate (A = B_emb), the
  untied head's input and BERT's MLM transform;
* per small layer j: ``B_q``, ``B_k``, ``B_v`` in *head units* ([H2, H1], [KV2, KV1], [KV2, KV1],
  applied as ``B kron I_head_dim``, so head_dim is kept and every head's RoPE halves stay paired);
  o's input follows ``B_v`` (A_O = B_V) under MHA. Under GQA (kv_heads < heads in either model) o's
  input slots are query-head slots, so A_O follows ``B_q`` instead (see `ops.o_axis`);
* per small layer j: ``B_ffn`` [F2, F1] for the outputs of up (and gate: SwiGLU's two inputs must
  stay paired), with A_down = B_ffn;
* biases follow their weight's output map.

Then depth: large layer l's tensor s is ``sum_j w_s[l, j] * widened_j[s]``, one [L2, L1] matrix per
per-layer tensor name (weights and biases separately, as in the official code). For post-LN
(BERT) the two norm gains also get a learned coefficient on the identity norm (gain 1), which
is 0 except in the "fpi" init (it lets new BERT layers start as identities, see
`depth.identity_plan`).

Tying of the input side (``tying``): "paper" is A = B, as in the paper and its code (not function
preserving: W' B x = B W B^T B x). "pinv" is A = B (B^T B)^-1, so a grown layer reading ``B x``
sees ``W x``; for copy matrices it is exactly Net2Net's fan-in division. The map stays linear in
the small weights either way; only the in-side of each B changes.

Inits (``init``):

* "stack_noisy" (the official default; tying "paper"): depth one-hot at ``l mod L1`` plus
  U(0, noise) noise, rows renormalised to sum 1; width ``[I; C]`` with each new unit a random
  convex combination of the old ones. Not function preserving.
* "net2net" (tying "paper"): depth one-hot at ``l mod L1``; width Net2Net copies (the first n1
  units kept, extra units copy random old ones). Not function preserving (A = B gives no fan-in
  division).
* "fpi" (tying "pinv"): width copies with even tiling, depth = the L1 layers in order with new
  layers (copies of the layer before) whose residual writers have zero depth weights. This is
  the FPI/Net2Net model exactly (`net2net.fpi(depth="identity")`), hence function preserving
  wherever FPI is: any depth and any MLP/head growth, integer residual multiples (all families),
  exact up to LayerNorm eps for new BERT layers.

``symmetry_noise`` (default 0; init "fpi" or "net2net" only) breaks the copies' symmetry after the
fit, as FPI with noise does (growth/symmetry.py). A copy init stays a copy through the fit: twin
units start equal, and swapping them is a symmetry of the loss, so their map rows get equal
gradients and stay equal under Adam. The fitted model then trains as the small width while
paying the large one's FLOPs, like unbroken FPI. So the materialised (never the fitted) model gets
the zero-sum noise over the init's copies: exact in function, each tensor's noise scaled by the
std of the widened small tensor its large layer copies (the depth plan's source; what FPI uses),
so with 0 fit steps ``init="fpi", symmetry_noise=s`` is FPI with noise s exactly.

``depth_init`` (default: the init's own) starts the depth matrices from another init's depth part
while the width maps keep ``init``'s: ``init="stack_noisy", depth_init="fpi"`` is a learned width map
over FPI's depth plan (new layers start as copies whose residual writers are off). Only the
starting point changes; every map is still learned.

Differences from the official code: every B is learned in full (the official code fixes B's top
block at I and learns only the rows below); the GQA tying above and the "pinv"/"fpi" options are
additions (the official code is BERT/RoBERTa only).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..families import ModelSpec, canonical_keys, norm_position
from .depth import identity_plan
from .ops import (LAYER_ROLES, DenseMap, GrowthError, add_identity, apply_roles, check_growth, convex_rows,
                  join_layers, mix_one_layer, mix_one_tensor, o_axis, selection_maps, split_layers, widen_global,
                  widen_layer)
from .symmetry import break_symmetry

INITS = ("stack_noisy", "net2net", "fpi")


def _pname(s: str) -> str:
    return s.replace(".", "__")


class LiGO(nn.Module):
    """The learned growth operator. Its parameters are only the maps; the small weights are frozen
    buffers. ``op()`` returns the large canonical dict (differentiable in the maps)."""

    def __init__(self, small: ModelSpec, canonical: dict, large: ModelSpec, init: str = "stack_noisy",
                 tying: Optional[str] = None, noise: float = 0.03, seed: int = 0,
                 depth_init: Optional[str] = None, symmetry_noise: float = 0.0):
        super().__init__()
        check_ligo(small, large, init, tying, depth_init, symmetry_noise)
        depth_init = depth_init or init
        self.small, self.large, self.init = small, large, init
        self.tying = tying or ("pinv" if init == "fpi" else "paper")
        layers, glob = split_layers(small, canonical)
        self.layer_names = list(layers[0])
        self.global_names = list(glob)
        self.head_tied = "head.weight" not in glob
        self.post_ln = norm_position(small) == "post"
        self.o_axis = o_axis(small, large)
        # The small weights are frozen buffers sharing the caller's storage (never written to).
        for j, layer in enumerate(layers):
            for s, t in layer.items():
                self.register_buffer(f"small_{j}__{_pname(s)}", t.detach(), persistent=False)
        for k, t in glob.items():
            self.register_buffer(f"small_g__{_pname(k)}", t.detach(), persistent=False)

        L1, L2 = small.layers, large.layers
        g = torch.Generator().manual_seed(seed)
        self.seed, self.symmetry_noise = int(seed), float(symmetry_noise)
        self.copy_maps = None
        sizes = {"res": (large.hidden, small.hidden), "q": (large.heads, small.heads),
                 "k": (large.n_kv_heads, small.n_kv_heads), "v": (large.n_kv_heads, small.n_kv_heads),
                 "ffn": (large.ffn_dim, small.ffn_dim)}
        if init == "stack_noisy":  # a fresh random draw per matrix
            def width(axis):
                return nn.Parameter(convex_rows(*sizes[axis], g))
        else:  # one copy map for every layer
            sel = selection_maps(small, large, "random" if init == "net2net" else "even", g)
            self.copy_maps = sel  # the copies symmetry_noise tells apart

            def width(axis):
                return nn.Parameter(sel[axis].matrix())
        self.res = width("res")
        self.q = nn.ParameterList([width("q") for _ in range(L1)])
        self.k = nn.ParameterList([width("k") for _ in range(L1)])
        self.v = nn.ParameterList([width("v") for _ in range(L1)])
        self.ffn = nn.ParameterList([width("ffn") for _ in range(L1)])

        onehot = torch.zeros(L2, L1)
        onehot[torch.arange(L2), torch.arange(L2) % L1] = 1.0
        depth: dict = {}
        ident = None
        self.source = [l % L1 for l in range(L2)]  # the small layer each large layer starts from
        if depth_init == "stack_noisy":
            for s in self.layer_names:
                w = onehot + noise * torch.rand(L2, L1, generator=g)
                depth[s] = w / w.sum(1, keepdim=True)
        elif depth_init == "net2net":
            depth = {s: onehot.clone() for s in self.layer_names}
        else:
            plan = identity_plan(L1, L2, self.post_ln)
            self.source = list(plan.src)
            depth, ident = plan.matrices(self.layer_names, L1, self.post_ln)
            depth = {s: w.float() for s, w in depth.items()}
        self.depth = nn.ParameterDict({_pname(s): nn.Parameter(w) for s, w in depth.items()})
        if self.post_ln:
            ident = ident or {s: torch.zeros(L2, dtype=torch.float64) for s in ("attn_norm.weight", "mlp_norm.weight")}
            self.ident = nn.ParameterDict({_pname(s): nn.Parameter(c.float()) for s, c in ident.items()})
        else:
            self.ident = None

    # -- the map ---------------------------------------------------------------------------------
    def small_layer(self, j: int) -> dict:
        return {s: getattr(self, f"small_{j}__{_pname(s)}") for s in self.layer_names}

    def small_global(self) -> dict:
        return {k: getattr(self, f"small_g__{_pname(k)}") for k in self.global_names}

    def res_map(self) -> DenseMap:
        return DenseMap(self.res, 1, self.tying)

    def layer_maps(self, j: int, res: DenseMap) -> dict:
        hd = self.small.head_dim
        maps = {"res": res, "q": DenseMap(self.q[j], hd, self.tying), "k": DenseMap(self.k[j], hd, self.tying),
                "v": DenseMap(self.v[j], hd, self.tying), "ffn": DenseMap(self.ffn[j], 1, self.tying)}
        maps["o"] = maps[self.o_axis]
        return maps

    def widened_layers(self, res: Optional[DenseMap] = None) -> list[dict]:
        """R_width: the L1 small layers grown to the large width."""
        res = res or self.res_map()
        return [widen_layer(self.small_layer(j), self.layer_maps(j, res), self.head_tied)
                for j in range(self.small.layers)]

    def global_weights(self, res: Optional[DenseMap] = None) -> dict:
        return widen_global(self.small_global(), {"res": res or self.res_map()}, self.head_tied)

    def depth_weights(self) -> tuple[dict, Optional[dict]]:
        w = {s: self.depth[_pname(s)] for s in self.layer_names}
        ident = {s: self.ident[_pname(s)] for s in ("attn_norm.weight", "mlp_norm.weight")} if self.ident else None
        return w, ident

    def large_layer(self, widened: list[dict], l: int) -> dict:
        """L_depth for one large layer (what fit.py materialises inside that layer's forward)."""
        w, ident = self.depth_weights()
        return mix_one_layer(widened, w, l, ident)

    def streamed_layer(self, l: int, res: Optional[DenseMap] = None) -> dict:
        """Large layer l made tensor by tensor, with one widened small tensor alive at a time (L1
        widenings per large layer instead of L1 in all): what writing a grown model into a sharded
        engine uses, so a rank holds the operator, the large layer being made and one widened
        tensor, never the large model. The same sums as `large_layer`'s, in the same order, so the
        tensors are bitwise equal."""
        res = res or self.res_map()
        w, ident = self.depth_weights()
        small = [self.small_layer(j) for j in range(self.small.layers)]
        maps = [self.layer_maps(j, res) for j in range(self.small.layers)]
        layer = {s: mix_one_tensor((apply_roles(small[j][s], LAYER_ROLES[s], maps[j], self.head_tied)
                                    for j in range(self.small.layers)), w[s][l])
                 for s in self.layer_names}
        return add_identity(layer, ident, l)

    def broken_global(self, glob: dict) -> dict:
        """The large model's global tensors with `symmetry_noise` (see the module doc); unchanged
        without it. Applied to the model written out, never inside the fit."""
        if not self.symmetry_noise:
            return glob
        return {k: break_symmetry(k, t, self.copy_maps, self.symmetry_noise, self.seed) for k, t in glob.items()}

    def broken_layer(self, l: int, layer: dict, res: Optional[DenseMap] = None) -> dict:
        """Large layer `l`'s tensors with `symmetry_noise`, each noised at the scale of the small
        tensor it was copied from. The source layer's maps are built once per layer (with pinv tying
        each builds a solve), not once per tensor. Each tensor's noise comes from its own generator
        (seed, key), so the result does not depend on the order tensors are visited."""
        if not self.symmetry_noise:
            return layer
        j = self.source[l]
        small, maps = self.small_layer(j), self.layer_maps(j, res or self.res_map())
        return {s: break_symmetry(f"layers.{l}.{s}", t, self.copy_maps, self.symmetry_noise, self.seed,
                                  ref=apply_roles(small[s], LAYER_ROLES[s], maps, self.head_tied))
                for s, t in layer.items()}

    def forward(self) -> dict:
        """The whole large canonical dict."""
        res = self.res_map()
        widened = self.widened_layers(res)
        big = [self.large_layer(widened, l) for l in range(self.large.layers)]
        return join_layers(big, self.global_weights(res), canonical_keys(self.large))

    @torch.no_grad()
    def materialize(self) -> dict:
        """Detached large canonical dict (fresh tensors): the operator is applied once and can be
        discarded."""
        res = self.res_map()
        widened = self.widened_layers(res)
        big = [self.broken_layer(l, self.large_layer(widened, l), res) for l in range(self.large.layers)]
        out = join_layers(big, self.broken_global(self.global_weights(res)), canonical_keys(self.large))
        return {k: t.contiguous() for k, t in out.items()}

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_ligo(small: ModelSpec, large: ModelSpec, init: str = "stack_noisy", tying: Optional[str] = None,
               depth_init: Optional[str] = None, symmetry_noise: float = 0.0) -> None:
    if init not in INITS:
        raise GrowthError(f"ligo: init must be one of {', '.join(INITS)}, got {init!r}")
    if depth_init is not None and depth_init not in INITS:
        raise GrowthError(f"ligo: depth_init must be one of {', '.join(INITS)}, got {depth_init!r}")
    if tying not in (None, "paper", "pinv"):
        raise GrowthError(f"ligo: tying must be 'paper' or 'pinv', got {tying!r}")
    if isinstance(symmetry_noise, bool) or not isinstance(symmetry_noise, (int, float)) or not symmetry_noise >= 0:
        raise GrowthError(f"ligo: symmetry_noise must be a number >= 0, got {symmetry_noise!r}")
    if symmetry_noise and init == "stack_noisy":
        raise GrowthError("ligo: symmetry_noise needs a copy init (init fpi or net2net); "
                          "init stack_noisy has no copies to tell apart")
    check_growth(small, large, "ligo" if init == "stack_noisy" else f"ligo init={init}",
                 copy_heads=init != "stack_noisy")


__all__ = ["LiGO", "INITS", "check_ligo"]
