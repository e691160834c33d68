"""A model shape for a parameter count: the aspect rule behind `dsgrow plan --progressive`.

The Chinchilla fit says how many parameters a budget buys, not what shape they take. Kaplan et al.
(2020) found the loss nearly flat in the depth/width ratio over a wide range, so any sensible rule
will do; this one copies the shapes the families ship with, so that a plan reads like a familiar
model:

  - width per layer (hidden / layers) near 64 for gpt2 and bert (GPT-2 small and BERT-base are
    768 / 12) and near 128 for llama (LLaMA 7B and 13B are 4096 / 32 and 5120 / 40);
  - head dim 64 from hidden 256 up (GPT-2, BERT, LLaMA), 32 from 128, 16 from 32 and 8 below, so
    tiny models keep a few heads; hidden is a multiple of the head dim;
  - llama with 8 or more heads uses grouped-query attention with heads / 4 kv heads (LLaMA-3 8B:
    32 / 8), so hidden is then a multiple of 4 head dims;
  - N counts every parameter, embeddings (and an untied head) included, as the Chinchilla fit
    counts it: ModelSpec.n_params(include_embeddings=True).

Search: for every allowed width the depth that gives exactly N is solved (the count is affine in
depth) and rounded to the nearest allowed depth on either side; among shapes within 10% of N the
one whose hidden / layers is nearest the family's ratio (in log) wins, and if none is that close
the one nearest N. At tiny budgets the embeddings take most of N and the ratio gives way: 3e12
FLOPs with a 2048-piece vocabulary is a 4 x 32 GPT-2 (aspect 8), the only shape near N that a
one-layer start can grow into.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Iterator, Optional

from ..families.spec import ModelSpec, SpecError
from .batch import ScheduleError

ASPECT = {"gpt2": 64, "bert": 64, "llama": 128}
"""Target hidden / layers per family."""
PARAM_TOLERANCE = 0.10
"""Shapes within this fraction of N compete on aspect ratio."""
MAX_HIDDEN = 1 << 16
MAX_LAYERS = 1024


def head_dim_for(hidden: int) -> int:
    return 64 if hidden >= 256 else 32 if hidden >= 128 else 16 if hidden >= 32 else 8


def make_spec(family: str, layers: int, hidden: int, vocab_size: int, seq_len: int,
              heads: Optional[int] = None) -> ModelSpec:
    """The spec of one shape under the rule above (heads from the head-dim rule unless given)."""
    if heads is None:
        hd = head_dim_for(hidden)
        if hidden % hd:
            raise ScheduleError(f"hidden {hidden} is not a multiple of the head dim {hd} the shape rule uses; "
                                "give --heads")
        heads = hidden // hd
    kv = heads // 4 if family == "llama" and heads >= 8 and heads % 4 == 0 else None
    try:
        return ModelSpec(family=family, layers=layers, hidden=hidden, heads=heads, kv_heads=kv,
                         vocab_size=vocab_size, max_seq_len=seq_len)
    except SpecError as e:
        raise ScheduleError(str(e)) from None


def n_params(spec: ModelSpec) -> int:
    """Parameters as the Chinchilla fit counts them: all of them."""
    return spec.n_params(include_embeddings=True)


def candidate_widths(family: str) -> Iterator[int]:
    for h in range(8, MAX_HIDDEN + 1, 8):
        hd = head_dim_for(h)
        heads = h // hd
        if h % hd == 0 and not (family == "llama" and heads >= 8 and heads % 4):
            yield h


def choose_shape(n_target: float, family: str, vocab_size: int, seq_len: int, min_layers: int = 1,
                 layer_ok: Callable[[int], bool] = lambda layers: True) -> ModelSpec:
    """The shape nearest `n_target` parameters under the rule in the module docstring, with
    layers >= min_layers and layer_ok(layers) (a growth method's depth rule)."""
    if family not in ASPECT:
        raise ScheduleError(f"unknown family {family!r} (choose from {', '.join(ASPECT)})")
    allowed = [d for d in range(max(min_layers, 1), MAX_LAYERS + 1) if layer_ok(d)]
    if not allowed:
        raise ScheduleError(f"no depth from {min_layers} to {MAX_LAYERS} layers fits the growth schedule")
    best: Optional[tuple] = None
    for h in candidate_widths(family):
        one = n_params(make_spec(family, 1, h, vocab_size, seq_len))
        per_layer = n_params(make_spec(family, 2, h, vocab_size, seq_len)) - one
        exact = (n_target - (one - per_layer)) / per_layer
        i = bisect.bisect_left(allowed, exact)
        for d in {allowed[max(i - 1, 0)], allowed[min(i, len(allowed) - 1)]}:
            p = one + (d - 1) * per_layer
            err = abs(math.log(p / n_target))
            key = ((0, abs(math.log(h / d / ASPECT[family])), err) if err <= math.log1p(PARAM_TOLERANCE)
                   else (1, err, 0.0))
            if best is None or key < best[0]:
                best = (key, d, h)
        if one + (allowed[0] - 1) * per_layer > n_target * (1 + PARAM_TOLERANCE):
            break  # wider only adds parameters at the shallowest allowed depth
    return make_spec(family, best[1], best[2], vocab_size, seq_len)


__all__ = ["ASPECT", "head_dim_for", "make_spec", "n_params", "choose_shape"]
