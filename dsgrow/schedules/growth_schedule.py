"""When a growth is due in a user's own loop, and how their LR schedule goes on after it.

    plan = dsgrow.GrowthSchedule(at_tokens=[2_000_000], rewarm_tokens=200_000)
    for step, batch in enumerate(loader):
        ...
        tokens += batch["input_ids"].numel() * world
        if plan.due(tokens, done=len(reports)):
            engine, report = dsgrow.grow_engine(engine, ...); reports.append(report)
        lr = plan.lr(my_schedule, tokens)       # my_schedule: tokens -> LR, the whole run's
        for g in engine.optimizer.param_groups: g["lr"] = lr * g.get("lr_scale", 1.0)  # muP groups

Pure functions of the counter the loop already keeps (tokens or steps): nothing to checkpoint,
a resumed loop gets the same answers. `lr` offers the usual continuations: "continue" (one
schedule over the whole run, e.g. warmup-stable-decay, unchanged by a growth), "rewarm" (the same
schedule, ramped up again from 0 over `rewarm_tokens` after each growth, as G_stack and LiGO
warm up the grown model), and "restart" (the schedule re-run from 0 for each stage's tokens).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

LR_MODES = ("continue", "rewarm", "restart")


@dataclass(frozen=True)
class GrowthSchedule:
    at: Sequence[int] = ()
    """Counter values (tokens, or steps) at which growths are due, ascending."""
    mode: str = "continue"
    """How the LR continues after a growth: continue | rewarm | restart."""
    rewarm: int = 0
    """Counter span of the rewarm ramp (mode rewarm)."""

    def __init__(self, at_tokens: Sequence[int] = (), at_steps: Sequence[int] = (), mode: str = "continue",
                 rewarm_tokens: int = 0, rewarm_steps: int = 0):
        if at_tokens and at_steps:
            raise ValueError("GrowthSchedule: give at_tokens or at_steps, not both")
        at = tuple(int(x) for x in (at_tokens or at_steps))
        if any(x <= 0 for x in at) or list(at) != sorted(set(at)):
            raise ValueError(f"GrowthSchedule: growth points must be positive and strictly ascending, got {list(at)}")
        if mode not in LR_MODES:
            raise ValueError(f"GrowthSchedule: mode must be one of {', '.join(LR_MODES)}, got {mode!r}")
        rewarm = int(rewarm_tokens or rewarm_steps)
        if mode == "rewarm" and rewarm <= 0:
            raise ValueError("GrowthSchedule: mode 'rewarm' needs rewarm_tokens (or rewarm_steps) > 0")
        object.__setattr__(self, "at", at)
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "rewarm", rewarm)

    def growths_by(self, counter: int) -> int:
        """How many growths are due once the counter has reached `counter`."""
        return bisect.bisect_right(self.at, counter)

    def due(self, counter: int, done: int) -> bool:
        """True when a growth is due and not done yet (`done`: growths carried out so far)."""
        return self.growths_by(counter) > done

    def stage_start(self, counter: int) -> int:
        """Counter value at which the current stage began (0, or the last growth point passed)."""
        k = self.growths_by(counter)
        return self.at[k - 1] if k else 0

    def lr(self, schedule: Callable[[int], float], counter: int) -> float:
        """The LR at `counter`, from `schedule` (counter -> LR) continued across growths by `mode`."""
        start = self.stage_start(counter)
        if self.mode == "restart":
            return schedule(counter - start)
        base = schedule(counter)
        if self.mode == "rewarm" and start > 0 and counter - start < self.rewarm:
            return base * (counter - start) / self.rewarm
        return base


__all__ = ["GrowthSchedule", "LR_MODES"]
