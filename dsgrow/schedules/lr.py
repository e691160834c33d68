"""Learning-rate schedules as pure functions of tokens seen."""
from __future__ import annotations

import math


def warmup_cosine(tokens: float, total_tokens: float, peak_lr: float, warmup_tokens: float = 0.0,
                  min_lr_ratio: float = 0.1) -> float:
    """Linear warmup from 0 to `peak_lr` over `warmup_tokens`, then cosine decay to
    `min_lr_ratio * peak_lr` at `total_tokens`; flat at the minimum after that."""
    if warmup_tokens > 0 and tokens < warmup_tokens:
        return peak_lr * tokens / warmup_tokens
    span = max(total_tokens - warmup_tokens, 1.0)
    progress = min(max((tokens - warmup_tokens) / span, 0.0), 1.0)
    floor = min_lr_ratio * peak_lr
    return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * progress))


def step_decay_multiplier(tokens: float, decay_tokens, factor=0.1) -> float:
    """Product of the decay factors whose token points are <= `tokens` (1.0 before the first).
    `factor` is one number for every point or a sequence with one factor per point."""
    points = list(decay_tokens)
    factors = list(factor) if isinstance(factor, (list, tuple)) else [factor] * len(points)
    if len(factors) != len(points):
        raise ValueError(f"step decay: {len(points)} decay points but {len(factors)} factors")
    m = 1.0
    for t, f in zip(points, factors):
        if tokens >= t:
            m *= f
    return m


def step_decay(tokens: float, peak_lr: float, decay_tokens, factor=0.1, warmup_tokens: float = 0.0) -> float:
    """Linear warmup to `peak_lr` over `warmup_tokens`, then multiply by `factor` at each point
    of `decay_tokens` (the schedule Smith et al. 2018 replace by batch growth; see
    dsgrow.schedules.batch.GrowInsteadOfDecay)."""
    if warmup_tokens > 0 and tokens < warmup_tokens:
        return peak_lr * tokens / warmup_tokens
    return peak_lr * step_decay_multiplier(tokens, decay_tokens, factor)


DECAY_SHAPES = ("linear", "1-sqrt", "cosine")


def warmup_stable_decay(tokens: float, total_tokens: float, peak_lr: float, warmup_tokens: float = 0.0,
                        decay_tokens: float = 0.0, min_lr_ratio: float = 0.0, shape: str = "1-sqrt") -> float:
    """Warmup-stable-decay (WSD): linear warmup to `peak_lr`, constant, then a decay to
    `min_lr_ratio * peak_lr` over the last `decay_tokens` of `total_tokens`; flat after that.

    The stable phase is what makes WSD suit growth: the LR does not fall before a growth, and a
    run's length need not be fixed until the decay starts. Shapes: "1-sqrt" (Hägele et al. 2024
    found it matches cosine at equal length), "linear" (MiniCPM, DeepSeek), "cosine" (a half
    cosine over the decay span only)."""
    if shape not in DECAY_SHAPES:
        raise ValueError(f"WSD decay shape must be one of {', '.join(DECAY_SHAPES)}, got {shape!r}")
    if warmup_tokens > 0 and tokens < warmup_tokens:
        return peak_lr * tokens / warmup_tokens
    decay_start = total_tokens - decay_tokens
    if decay_tokens <= 0 or tokens <= decay_start:
        return peak_lr
    progress = min((tokens - decay_start) / decay_tokens, 1.0)
    if shape == "linear":
        frac = 1.0 - progress
    elif shape == "1-sqrt":
        frac = 1.0 - math.sqrt(progress)
    else:
        frac = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = min_lr_ratio * peak_lr
    return floor + (peak_lr - floor) * frac


def lr_at(kind: str, tokens: float, total_tokens: float, peak_lr: float, warmup_tokens: float = 0.0,
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2, decay_shape: str = "1-sqrt") -> float:
    """The LR of schedule `kind` (cosine | wsd | constant: warmup, then flat) at `tokens` of a
    schedule `total_tokens` long; the one dispatch behind `lr_schedule` and the trainer's stages."""
    if kind == "cosine":
        return warmup_cosine(tokens, total_tokens, peak_lr, warmup_tokens, min_lr_ratio)
    if kind == "wsd":
        return warmup_stable_decay(tokens, total_tokens, peak_lr, warmup_tokens, decay_fraction * total_tokens,
                                   min_lr_ratio, decay_shape)
    if kind == "constant":
        return peak_lr * min(1.0, tokens / warmup_tokens) if warmup_tokens else peak_lr
    raise ValueError(f"lr_schedule: unknown kind {kind!r} (cosine, wsd or constant)")


def lr_schedule(kind: str, total_tokens: float, peak_lr: float, warmup_tokens: float = 0.0,
                min_lr_ratio: float = 0.1, decay_fraction: float = 0.2, decay_shape: str = "1-sqrt"):
    """A schedule as a function tokens -> LR, for a user's own loop (`GrowthSchedule.lr` takes it):

        sched = dsgrow.lr_schedule("wsd", total_tokens=10e9, peak_lr=3e-4, warmup_tokens=2e8)
        lr = growth_plan.lr(sched, tokens)     # one schedule over the whole run, across growths

    kind: cosine | wsd | constant (warmup, then flat). Bad arguments raise here, not at step N."""
    if kind == "wsd":
        if not 0.0 <= decay_fraction <= 1.0:
            raise ValueError(f"WSD decay_fraction must be in [0, 1], got {decay_fraction}")
    # Evaluated once now so that an unknown kind or WSD shape raises here, not at step N.
    lr_at(kind, 0.0, total_tokens, peak_lr, warmup_tokens, min_lr_ratio, decay_fraction, decay_shape)
    return lambda t: lr_at(kind, t, total_tokens, peak_lr, warmup_tokens, min_lr_ratio, decay_fraction, decay_shape)
