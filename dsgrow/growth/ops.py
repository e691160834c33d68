"""The pieces every growth operator is made of, on the canonical layout (pure torch).

Every operator here is linear in the small model's weights and factors as width then depth:

* width: each axis of a canonical tensor is grown by a linear map. An `AxisMap` grows an axis of
  `n1` units into `n2` units, a unit being one neuron (residual stream, MLP hidden) or one
  attention head of `head_dim` rows (q, k, v, and o's input). Heads are always moved whole, so a
  head's RoPE halves and its 1/sqrt(head_dim) scale are untouched. A map acts on an axis in one of
  two roles: *out* (the values of that axis are produced: ``W' = B W``) or *in* (the axis is
  consumed: ``W' = W A^T``). For copy maps (Net2Net) B copies units and A divides by the copy
  count (fan-in division); for LiGO's dense maps A is B itself (the paper's tying) or B's
  pseudo-inverse transpose (see `DenseMap`).
* depth: large layer ``l`` is ``sum_j w[l, j] * widened_layer_j`` with one ``[L2, L1]`` matrix per
  per-layer tensor name (q.weight, q.bias, ...). Post-LN families may also mix in the *identity
  norm* (gain 1, bias 0) through an extra column; see `mix_one_layer`.

`LAYER_ROLES` / `GLOBAL_ROLES` say, for each canonical tensor, which map acts on which dimension in which role.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

import torch

from ..families.spec import ModelSpec


class GrowthError(ValueError):
    """A growth request that cannot be carried out (one line naming the problem)."""


# ------------------------------------------------------------------------------------------------
# Which map acts on which dimension of each canonical tensor
# ------------------------------------------------------------------------------------------------
# (axis, role) per tensor dimension; None leaves the dimension alone. Axes: "res" (residual
# stream, D), "q" (query heads), "k" / "v" (key / value heads), "o" (the heads o reads: v's map
# under MHA as in the paper, q's under GQA, see `o_axis`), "ffn" (MLP hidden, F).
# "head_in" on a vector means: the vector feeds a *tied* LM head, so it is grown with the
# residual map's in-role (fan-in division); untied, it is an ordinary residual vector.
LAYER_ROLES: dict[str, tuple] = {
    "attn_norm.weight": (("res", "out"),), "attn_norm.bias": (("res", "out"),),
    "mlp_norm.weight": (("res", "out"),), "mlp_norm.bias": (("res", "out"),),
    "q.weight": (("q", "out"), ("res", "in")), "q.bias": (("q", "out"),),
    "k.weight": (("k", "out"), ("res", "in")), "k.bias": (("k", "out"),),
    "v.weight": (("v", "out"), ("res", "in")), "v.bias": (("v", "out"),),
    "o.weight": (("res", "out"), ("o", "in")), "o.bias": (("res", "out"),),
    "gate.weight": (("ffn", "out"), ("res", "in")), "gate.bias": (("ffn", "out"),),
    "up.weight": (("ffn", "out"), ("res", "in")), "up.bias": (("ffn", "out"),),
    "down.weight": (("res", "out"), ("ffn", "in")), "down.bias": (("res", "out"),),
}
GLOBAL_ROLES: dict[str, tuple] = {
    "tok_emb": (None, ("res", "out")), "pos_emb": (None, ("res", "out")), "type_emb": (None, ("res", "out")),
    "emb_norm.weight": (("res", "out"),), "emb_norm.bias": (("res", "out"),),
    "final_norm.weight": ("head_in",), "final_norm.bias": ("head_in",),
    "mlm.dense.weight": (("res", "out"), ("res", "in")), "mlm.dense.bias": (("res", "out"),),
    "mlm.norm.weight": ("head_in",), "mlm.norm.bias": ("head_in",),
    "head.weight": (None, ("res", "in")),
    "mlm.bias": (None,),
}
# Per-layer tensors that write into the residual stream: zeroing them makes a pre-LN block the
# identity (Net2Net's deeper operator).
RESIDUAL_WRITERS = ("o.weight", "o.bias", "down.weight", "down.bias")


def layer_key(i: int, suffix: str) -> str:
    return f"layers.{i}.{suffix}"


def split_layers(spec: ModelSpec, canonical: dict) -> tuple[list[dict], dict]:
    """([per-layer dict suffix -> tensor] * L, global dict) of a canonical model."""
    layers: list[dict] = [{} for _ in range(spec.layers)]
    glob = {}
    for k, t in canonical.items():
        if k.startswith("layers."):
            _, i, suffix = k.split(".", 2)
            if suffix not in LAYER_ROLES:
                raise GrowthError(f"canonical tensor {k!r}: no growth rule for {suffix!r}")
            layers[int(i)][suffix] = t
        else:
            if k not in GLOBAL_ROLES:
                raise GrowthError(f"canonical tensor {k!r}: no growth rule for it")
            glob[k] = t
    return layers, glob


def join_layers(layers: Sequence[dict], glob: dict, order: Optional[Iterable[str]] = None) -> dict:
    out = dict(glob)
    for i, layer in enumerate(layers):
        for suffix, t in layer.items():
            out[layer_key(i, suffix)] = t
    if order is not None:
        out = {k: out[k] for k in order}
    return out


def o_axis(spec_small: ModelSpec, spec_large: ModelSpec) -> str:
    """The head map o's input follows: v's under MHA (LiGO's A_O = B_V), q's under GQA.

    o consumes one head_dim slot per *query* head. Under MHA query head h reads value head h, so
    the paper's tying to the value map is the natural one. Under GQA slot h carries query head h's
    attention over its group's values, so it is indexed by query heads and follows the q map; with
    consistent copy maps the two choices agree wherever both are defined.
    """
    mha = spec_small.n_kv_heads == spec_small.heads and spec_large.n_kv_heads == spec_large.heads
    return "v" if mha else "q"


# ------------------------------------------------------------------------------------------------
# Axis maps
# ------------------------------------------------------------------------------------------------
def _apply_units(mat: torch.Tensor, t: torch.Tensor, dim: int, unit: int) -> torch.Tensor:
    """(mat kron I_unit) applied along `dim` of t: rows grouped in blocks of `unit` move together."""
    n1 = mat.shape[1]
    if t.shape[dim] != n1 * unit:
        raise GrowthError(f"axis of size {t.shape[dim]} does not match a map from {n1} units of {unit}")
    x = t.movedim(dim, 0)
    rest = x.shape[1:]
    x = x.reshape(n1, -1)
    y = mat.to(t.dtype) @ x
    return y.reshape(mat.shape[0] * unit, *rest).movedim(0, dim)


class AxisMap:
    """A linear map growing one axis from `n1` to `n2` units of `unit` rows."""

    n1: int
    n2: int
    unit: int

    def out(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError

    def inn(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError


class SelectMap(AxisMap):
    """Net2Net copy map: new unit i is old unit ``idx[i]``; in-role divides by the copy count."""

    def __init__(self, idx: torch.Tensor, n1: int, unit: int = 1):
        idx = torch.as_tensor(idx, dtype=torch.long)
        counts = torch.bincount(idx, minlength=n1)
        if idx.numel() and (idx.min() < 0 or idx.max() >= n1):
            raise GrowthError(f"selection index out of range [0, {n1})")
        if (counts == 0).any():
            raise GrowthError(f"selection drops unit {int((counts == 0).nonzero()[0])}: every old unit needs a copy")
        self.idx, self.counts, self.n1, self.n2, self.unit = idx, counts, n1, idx.numel(), unit

    def rows(self) -> torch.Tensor:
        """The old row each new row copies (units expanded: a head is `unit` rows)."""
        u = torch.arange(self.unit)
        return (self.idx[:, None] * self.unit + u).reshape(-1)

    def out(self, t, dim):
        return t.index_select(dim, self.rows())

    def inn(self, t, dim):
        scale = (1.0 / self.counts[self.idx].to(torch.float64)).repeat_interleave(self.unit)
        shape = [1] * t.dim()
        shape[dim] = -1
        return t.index_select(dim, self.rows()) * scale.to(t.dtype).reshape(shape)

    def matrix(self, dtype=torch.float32) -> torch.Tensor:
        """The [n2, n1] one-hot matrix of this map (LiGO's Net2Net-style inits start from it)."""
        m = torch.zeros(self.n2, self.n1, dtype=dtype)
        m[torch.arange(self.n2), self.idx] = 1.0
        return m


class DenseMap(AxisMap):
    """LiGO's learned map: out-role multiplies by B [n2, n1]; in-role by A.

    `tying="paper"`: A = B (Wang et al. 2023, sec. 3.3: the residual map B_emb also expands the
    inputs of Q/K/V/fc1, A_O = B_V, A_fc2 = B_fc1). `tying="pinv"`: A = B (B^T B)^-1, so that
    ``A^T B = I`` and a layer reading a grown vector ``B x`` computes exactly what it did on ``x``.
    For a copy matrix B, ``B (B^T B)^-1`` is Net2Net's fan-in division, so LiGO with pinv tying
    and copy matrices equals FPI; it stays defined (and differentiable) for any full-column-rank B.
    """

    def __init__(self, B: torch.Tensor, unit: int = 1, tying: str = "paper"):
        if tying not in ("paper", "pinv"):
            raise GrowthError(f"tying must be 'paper' or 'pinv', got {tying!r}")
        self.B, self.unit, self.tying = B, unit, tying
        self.n2, self.n1 = B.shape
        self._A: Optional[torch.Tensor] = None

    @property
    def A(self) -> torch.Tensor:
        if self._A is None:
            if self.tying == "paper":
                self._A = self.B
            else:
                B = self.B.double()
                self._A = torch.linalg.solve(B.T @ B, B.T).T.to(self.B.dtype)
        return self._A

    def out(self, t, dim):
        return _apply_units(self.B, t, dim, self.unit)

    def inn(self, t, dim):
        return _apply_units(self.A, t, dim, self.unit)


def apply_roles(t: torch.Tensor, roles: tuple, maps: dict, head_tied: bool) -> torch.Tensor:
    """Grow every dimension of `t` according to its roles (see LAYER_ROLES / GLOBAL_ROLES).

    Always returns a new tensor, so a grown model never aliases the small one."""
    if all(r is None for r in roles):
        return t.clone()
    for dim, role in enumerate(roles):
        if role is None:
            continue
        if role == "head_in":
            role = ("res", "in") if head_tied else ("res", "out")
        axis, kind = role
        m = maps[axis]
        t = m.out(t, dim) if kind == "out" else m.inn(t, dim)
    return t


def widen_layer(layer: dict, maps: dict, head_tied: bool) -> dict:
    """One layer's tensors grown by `maps` (axis -> AxisMap, "o" already resolved)."""
    return {s: apply_roles(t, LAYER_ROLES[s], maps, head_tied) for s, t in layer.items()}


def widen_global(glob: dict, maps: dict, head_tied: bool) -> dict:
    return {k: apply_roles(t, GLOBAL_ROLES[k], maps, head_tied) for k, t in glob.items()}


# ------------------------------------------------------------------------------------------------
# Depth
# ------------------------------------------------------------------------------------------------
def mix_one_layer(widened: Iterable[dict], w: dict, l: int, identity: Optional[dict] = None,
                  consume: bool = False) -> dict:
    """Large layer l: tensor s is ``sum_j w[s][l, j] * widened[j][s]``, summed in j order.

    `widened` may be any iterable of the L1 widened layers: a generator makes each one only when
    the sum reaches it, so one widened layer is alive at a time (depth.FixedGrowth).
    consume=True pops each widened tensor as its term is made (the dicts are the caller's to give
    up), so the layer being summed and the widened one are not both alive whole.
    `identity` (post-LN only) maps a norm weight name to ``[L2]`` coefficients of the identity
    norm: gain ``+= c[l] * 1``. The identity norm's bias is 0, so biases need no such term.
    """
    layer: dict = {}
    for j, wid in enumerate(widened):
        for s in list(wid):
            t = wid.pop(s) if consume else wid[s]
            term = w[s][l, j].to(t.dtype) * t
            del t
            layer[s] = term if j == 0 else layer[s] + term
            del term
    return add_identity(layer, identity, l)


def add_identity(layer: dict, identity: Optional[dict], l: int) -> dict:
    if identity is not None:
        for s in identity:
            layer[s] = layer[s] + identity[s][l].to(layer[s].dtype)
    return layer


def mix_one_tensor(widened: Iterable[torch.Tensor], coef: torch.Tensor) -> torch.Tensor:
    """``sum_j coef[j] * widened[j]`` in j order: one tensor of `mix_one_layer`, the same sum, so
    the result is bitwise the same; `widened` may be a generator (one widened tensor alive). The
    widened tensors must be fresh (apply_roles's are): under no_grad they are scaled in place."""
    # Without autograd (streaming a grown model into an engine) the sum is made in place: one
    # widened tensor and the running sum alive, not also the scaled term and the new sum. The same
    # products and sums either way, so the result is bitwise the same.
    inplace = not torch.is_grad_enabled()
    out = None
    for j, t in enumerate(widened):
        term = t.mul_(coef[j].to(t.dtype)) if inplace else coef[j].to(t.dtype) * t
        del t  # before the generator makes the next widened tensor
        if j == 0:
            out = term
        elif inplace:
            out += term
        else:
            out = out + term
        del term
    return out


# ------------------------------------------------------------------------------------------------
# Copy (selection) maps for Net2Net-style width growth
# ------------------------------------------------------------------------------------------------
def select_units(n1: int, n2: int, how: str = "even", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Which old unit each new unit copies. The first n1 are the old units in order.

    "even": new unit i copies i mod n1 (HyperCloning's tiling; every old unit gets the same number of
    copies when n2 is a multiple of n1). "random": extra units copy uniformly random old units
    (Net2Net, bert2BERT).
    """
    base = torch.arange(n1)
    if how == "even":
        return torch.arange(n2) % n1
    if how == "random":
        extra = torch.randint(0, n1, (n2 - n1,), generator=generator)
        return torch.cat([base, extra])
    raise GrowthError(f"select must be 'even' or 'random', got {how!r}")


def gqa_need(spec_small: ModelSpec, spec_large: ModelSpec) -> int:
    """New kv heads every old kv group needs so all its query heads fit into new groups."""
    g1 = spec_small.heads // spec_small.n_kv_heads
    g2 = spec_large.heads // spec_large.n_kv_heads
    return -(-g1 // g2)


def head_selections(spec_small: ModelSpec, spec_large: ModelSpec, how: str = "even",
                    generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(query-head, kv-head) copy indices that keep every query head inside its kv group.

    New kv head k' copies old kv head j = kv[k']; its g2 query heads copy old query heads of group
    j, cycling over the group across all new kv heads that copy j, so every old query head is
    copied when each old group gets at least ceil(g1/g2) new kv heads (checked by `check_growth`).
    Under MHA (g1 = g2 = 1) the query and kv selections are equal.
    """
    KV1, KV2 = spec_small.n_kv_heads, spec_large.n_kv_heads
    g1, g2 = spec_small.heads // KV1, spec_large.heads // KV2
    need = gqa_need(spec_small, spec_large)
    first = torch.arange(need * KV1) % KV1
    kv = torch.cat([first, select_units(KV1, KV2 - need * KV1 + KV1, how, generator)[KV1:]]) \
        if KV2 > need * KV1 else first[:KV2]
    q = torch.empty(spec_large.heads, dtype=torch.long)
    seen = torch.zeros(KV1, dtype=torch.long)
    for k2 in range(KV2):
        j = int(kv[k2])
        for s in range(g2):
            t = int(seen[j]) * g2 + s
            q[k2 * g2 + s] = j * g1 + t % g1
        seen[j] += 1
    return q, kv


def selection_maps(spec_small: ModelSpec, spec_large: ModelSpec, how: str = "even",
                   generator: Optional[torch.Generator] = None) -> dict:
    """Copy maps for every axis: res, q, k, v (k and v share one), ffn."""
    hd = spec_small.head_dim
    q, kv = head_selections(spec_small, spec_large, how, generator)
    kv_map = SelectMap(kv, spec_small.n_kv_heads, hd)
    maps = {
        "res": SelectMap(select_units(spec_small.hidden, spec_large.hidden, how, generator), spec_small.hidden),
        "q": SelectMap(q, spec_small.heads, hd),
        "k": kv_map, "v": kv_map,
        "ffn": SelectMap(select_units(spec_small.ffn_dim, spec_large.ffn_dim, how, generator), spec_small.ffn_dim),
    }
    maps["o"] = maps[o_axis(spec_small, spec_large)]
    return maps


# ------------------------------------------------------------------------------------------------
# Checks, all done before any work
# ------------------------------------------------------------------------------------------------
SIZE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "ffn")


def resolve_target(small: ModelSpec, target) -> ModelSpec:
    """The large spec from a ModelSpec or a dict of sizes.

    Fields a dict leaves out come from the small model, except those bound to a grown size: heads
    keeps the small head_dim, kv_heads keeps the query-per-kv group size, ffn keeps the small
    ffn/hidden ratio (when they divide exactly; otherwise they must be given).
    """
    if isinstance(target, ModelSpec):
        t = target
        if t.vocab_size == 0:
            t = dataclasses.replace(t, vocab_size=small.vocab_size)
        return t
    if not isinstance(target, dict):
        raise GrowthError(f"target must be a ModelSpec or a dict of sizes, got {type(target).__name__}")
    unknown = sorted(set(target) - set(SIZE_FIELDS) - {f.name for f in dataclasses.fields(ModelSpec)})
    if unknown:
        raise GrowthError(f"target: unknown field(s) {', '.join(unknown)} (sizes: {', '.join(SIZE_FIELDS)})")
    d = dict(target)
    for k in SIZE_FIELDS:
        if k in d and d[k] is not None and (not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] <= 0):
            raise GrowthError(f"target.{k} must be a positive integer, got {d[k]!r}")
    hidden = d.get("hidden", small.hidden)
    if "heads" not in d:
        if hidden % small.head_dim:
            raise GrowthError(f"target.hidden ({hidden}) is not a multiple of the small head_dim "
                              f"({small.head_dim}); give target.heads")
        d["heads"] = hidden // small.head_dim
    if "kv_heads" not in d:
        g = small.heads // small.n_kv_heads
        d["kv_heads"] = d["heads"] // g if d["heads"] % g == 0 else None
        if small.kv_heads is None and d["kv_heads"] == d["heads"]:
            d["kv_heads"] = None
    if "ffn" not in d:
        if (small.ffn_dim * hidden) % small.hidden:
            raise GrowthError(f"target.ffn: small ffn/hidden ratio {small.ffn_dim}/{small.hidden} gives no integer "
                              f"ffn at hidden {hidden}; give target.ffn")
        d["ffn"] = small.ffn_dim * hidden // small.hidden
    if "layers" not in d:
        d["layers"] = small.layers
    base = small.to_dict()
    base.update(d)
    try:
        return ModelSpec.from_dict(base)
    except ValueError as e:
        raise GrowthError(f"target: {e}") from None


def check_growth(small: ModelSpec, large: ModelSpec, method: str = "", copy_heads: bool = False,
                 integer_fields: Sequence[str] = (), integer_layers: bool = False) -> None:
    """Raise GrowthError (one line) unless `small` can grow into `large` with this method."""
    if small.family != large.family:
        raise GrowthError(f"family mismatch: small is {small.family}, target is {large.family}")
    if small.vocab_size != large.vocab_size:
        raise GrowthError(f"vocabulary mismatch: small has {small.vocab_size} tokens, target {large.vocab_size}")
    if small.head_dim != large.head_dim:
        raise GrowthError(f"head_dim must stay {small.head_dim} (hidden/heads), target has "
                          f"{large.hidden}/{large.heads} = {large.hidden / large.heads:g}")
    for name, a, b in (("layers", small.layers, large.layers), ("hidden", small.hidden, large.hidden),
                       ("heads", small.heads, large.heads), ("kv_heads", small.n_kv_heads, large.n_kv_heads),
                       ("ffn", small.ffn_dim, large.ffn_dim)):
        if b < a:
            raise GrowthError(f"cannot shrink {name}: {a} -> {b}")
    if small.learned_positions and small.max_seq_len != large.max_seq_len:
        raise GrowthError(f"max_seq_len must stay {small.max_seq_len} ({small.family} learns its positions), "
                          f"target has {large.max_seq_len}")
    for name in ("tied", "eps", "rope_theta"):
        if getattr(small, name) != getattr(large, name):
            raise GrowthError(f"{name} must match: small {getattr(small, name)}, target {getattr(large, name)}")
    from ..families.mup import check_same_base

    why = check_same_base(small, large)
    if why:
        raise GrowthError(why)
    sizes = {"hidden": (small.hidden, large.hidden), "heads": (small.heads, large.heads),
             "kv_heads": (small.n_kv_heads, large.n_kv_heads), "ffn": (small.ffn_dim, large.ffn_dim),
             "layers": (small.layers, large.layers)}
    for f in tuple(integer_fields) + (("layers",) if integer_layers else ()):
        a, b = sizes[f]
        if b % a:
            raise GrowthError(f"{method} grows {f} by integer multiples only: {a} -> {b} is x{b / a:.3g}")
    if copy_heads:  # every old query head must be copied into a group holding its kv head
        need = gqa_need(small, large)
        if large.n_kv_heads < need * small.n_kv_heads:
            raise GrowthError(
                f"{method}: {small.heads} query heads in {small.n_kv_heads} kv groups cannot be copied into "
                f"{large.n_kv_heads} groups of {large.heads // large.n_kv_heads}; need kv_heads >= "
                f"{need * small.n_kv_heads}")


def convex_rows(n2: int, n1: int, generator: torch.Generator) -> torch.Tensor:
    """[I; C] with C's rows random convex combinations of the n1 old units (LiGO's "rand" width init)."""
    c = torch.rand(n2 - n1, n1, generator=generator, dtype=torch.float64)
    c = c / c.sum(1, keepdim=True)
    return torch.cat([torch.eye(n1, dtype=torch.float64), c]).float()


def fmt_size(spec: ModelSpec) -> str:
    kv = f"/{spec.n_kv_heads}kv" if spec.n_kv_heads != spec.heads else ""
    return f"{spec.family} {spec.layers}L x {spec.hidden}d ({spec.heads}h{kv}, ffn {spec.ffn_dim})"


__all__ = [
    "GrowthError", "AxisMap", "SelectMap", "DenseMap", "LAYER_ROLES", "GLOBAL_ROLES", "RESIDUAL_WRITERS",
    "split_layers", "join_layers", "widen_layer", "widen_global", "mix_one_layer", "mix_one_tensor", "add_identity",
    "select_units", "head_selections", "selection_maps", "resolve_target", "check_growth", "convex_rows",
    "o_axis", "fmt_size",
]
