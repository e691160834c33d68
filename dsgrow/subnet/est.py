"""Evolving subnetwork training (EST; Li et al., ICML 2024, arXiv 2406.06962): the schedule, the
sampler and the FLOPs of what runs.

EST trains the large model through random subnetworks of itself that grow over training, in
phases: (1) a share of the layers, and in each a share of the attention heads and MLP neurons;
(2) every layer, still a share of heads and neurons; (3) the full model. The kept heads' output is
scaled by 1/p_H and the kept neurons' by 1/p_M (the paper's formulas: the kept units stand in for
all, as in dropout). Everything here is a pure function of (seed, step, tokens seen): every rank
draws the same subnetwork without communicating, and a resumed run draws the same sequence.

What the paper leaves unpublished (its code repository is empty; the paper's tables were not
reachable offline) is a dsgrow choice, written down here and in the README:
- defaults: phase 1 to 20% of the stage's tokens with half the layers, heads and neurons; phase 2
  to 50% with every layer and half the heads and neurons; then the full model;
- layers, heads and neurons are drawn uniformly without replacement, heads and neurons
  independently per layer; heads are drawn in whole key/value groups (GQA), so every kept query
  head keeps its own key and value; a resample every optimizer step (all micro-batches of a step
  train the same subnetwork, so its gradient is one subnetwork's);
- a skipped layer is the identity (no 1/p_L scaling of the residual stream);
- the optimizer is untouched: an unsampled unit gets a zero gradient, so AdamW still moves it by
  its momentum and its weight decay (dropout's behaviour, on which the paper builds its theory).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..config import ConfigError, build_typed
from ..families.spec import ModelSpec
from .slicing import FAMILIES, Sample

METHODS = ("est",)


@dataclass
class EstPhase:
    """One phase of the schedule: until `until` (a fraction of the stage's training tokens), each
    step trains `layers` of the blocks and, in each, `heads` of the heads and `ffn` of the MLP
    neurons (fractions in (0, 1], rounded to whole units, at least one)."""

    until: float = 1.0
    layers: float = 1.0
    heads: float = 1.0
    ffn: float = 1.0


def _default_phases() -> list:
    return [{"until": 0.2, "layers": 0.5, "heads": 0.5, "ffn": 0.5},
            {"until": 0.5, "layers": 1.0, "heads": 0.5, "ffn": 0.5}]


@dataclass
class EstConfig:
    """`train.subnetwork`: {method: est, phases: [{until, layers, heads, ffn}, ...], scale}."""

    method: str = "est"
    phases: list = field(default_factory=_default_phases)
    """The phases in order (mappings in a recipe; EstPhase once built); after the last one's
    `until`, the full model trains."""
    scale: bool = True
    """Scale the kept heads' and neurons' outputs by 1 / kept fraction (the paper's 1/p_H, 1/p_M)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"train.subnetwork.method: {self.method!r} is not one of {', '.join(METHODS)}")
        if not isinstance(self.phases, list) or not self.phases:
            raise ConfigError("train.subnetwork.phases: expected a non-empty list of {until, layers, heads, ffn}")
        typed, prev = [], 0.0
        for i, p in enumerate(self.phases):
            where = f"train.subnetwork.phases[{i}]"
            ph = p if isinstance(p, EstPhase) else build_typed(EstPhase, p, where)
            for name in ("until", "layers", "heads", "ffn"):
                v = getattr(ph, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
                    raise ConfigError(f"{where}.{name} must be a fraction in (0, 1], got {v!r}")
            if ph.until <= prev:
                raise ConfigError(f"{where}.until ({ph.until}) must be after the previous phase's ({prev})")
            prev = ph.until
            typed.append(ph)
        self.phases = typed

    def phase_at(self, fraction: float) -> Optional[EstPhase]:
        """The phase at `fraction` of the stage's training tokens; None once the full model trains."""
        for ph in self.phases:
            if fraction < ph.until:
                return ph
        return None



def est_config(raw) -> Optional[EstConfig]:
    """`train.subnetwork` as written (a mapping, or None) -> EstConfig; ConfigError on bad input."""
    if raw is None:
        return None
    if isinstance(raw, EstConfig):
        return raw
    return build_typed(EstConfig, raw, "train.subnetwork")


def check_family(spec: ModelSpec, where: str) -> None:
    if spec.family not in FAMILIES:
        raise ConfigError(f"{where}: subnetwork training runs on {', '.join(FAMILIES)}, not {spec.family}")


@dataclass(frozen=True)
class Counts:
    """How many units a phase keeps: layers, kv groups, query heads (per layer), MLP neurons."""

    layers: int
    kv_groups: int
    heads: int
    neurons: int


def _keep(fraction: float, n: int) -> int:
    return min(n, max(1, int(fraction * n + 0.5)))


def counts(spec: ModelSpec, phase: Optional[EstPhase]) -> Counts:
    if phase is None:
        return Counts(spec.layers, spec.n_kv_heads, spec.heads, spec.ffn_dim)
    group = spec.heads // spec.n_kv_heads
    kv = _keep(phase.heads, spec.n_kv_heads)  # whole kv groups: a query head needs its key/value
    return Counts(_keep(phase.layers, spec.layers), kv, kv * group, _keep(phase.ffn, spec.ffn_dim))


def draw(spec: ModelSpec, phase: Optional[EstPhase], seed: int, step: int, scale: bool = True) -> Optional[Sample]:
    """The subnetwork of optimizer step `step`: a pure function of its arguments (numpy's PCG64
    seeded by (seed, step): the same on every rank, platform and resume). None: the full model."""
    if phase is None:
        return None
    c = counts(spec, phase)
    rng = np.random.default_rng([int(seed), 0xE57, int(step)])
    layers = sorted(rng.choice(spec.layers, c.layers, replace=False).tolist())
    group = spec.heads // spec.n_kv_heads
    heads, neurons = {}, {}
    for i in layers:
        if c.heads < spec.heads:
            kv = np.sort(rng.choice(spec.n_kv_heads, c.kv_groups, replace=False))
            heads[i] = torch.from_numpy((kv[:, None] * group + np.arange(group)).reshape(-1)).long()
        if c.neurons < spec.ffn_dim:
            neurons[i] = torch.from_numpy(np.sort(rng.choice(spec.ffn_dim, c.neurons, replace=False))).long()
    return Sample(layers=layers, heads=heads, neurons=neurons,
                  head_scale=spec.heads / c.heads if scale else 1.0,
                  ffn_scale=spec.ffn_dim / c.neurons if scale else 1.0)


def _layer_params(spec: ModelSpec, q_dim: int, kv_dim: int, ffn: int) -> int:
    """Parameters one block multiplies with (weights and biases, as ModelSpec.n_params counts)."""
    h = spec.hidden
    attn = h * q_dim + 2 * h * kv_dim + q_dim * h
    if spec.family == "llama":
        return attn + 3 * h * ffn + 2 * h
    return attn + (q_dim + 2 * kv_dim + h) + 2 * h * ffn + ffn + h + 4 * h


def flops_per_token(spec: ModelSpec, seq_len: int, phase: Optional[EstPhase]) -> float:
    """Training FLOPs per token of a phase's subnetwork, counted as schedules/flops.py counts the
    full model (6 x matmul parameters + 12 x attention width x seq_len per layer): equal to it for
    the full model (tested)."""
    from ..schedules.flops import matmul_params

    c = counts(spec, phase)
    hd = spec.head_dim
    full_layer = _layer_params(spec, spec.hidden, spec.n_kv_heads * hd, spec.ffn_dim)
    outside = matmul_params(spec) - spec.layers * full_layer  # head, final norm
    layer = _layer_params(spec, c.heads * hd, c.kv_groups * hd, c.neurons)
    return 6.0 * (outside + c.layers * layer) + 12.0 * c.layers * c.heads * hd * seq_len


def mean_flops_per_token(spec: ModelSpec, seq_len: int, cfg: Optional[EstConfig]) -> float:
    """Average training FLOPs per token over a stage whose tokens all follow `cfg`'s phases."""
    if cfg is None:
        return flops_per_token(spec, seq_len, None)
    total, start = 0.0, 0.0
    for ph in cfg.phases:
        total += (ph.until - start) * flops_per_token(spec, seq_len, ph)
        start = ph.until
    return total + (1.0 - start) * flops_per_token(spec, seq_len, None)
