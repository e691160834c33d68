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
