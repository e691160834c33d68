"""One stage's batch size and LR: pure functions of the stage's tokens, plus the two pieces of
schedule state a run has (the adaptive batch and the gradient-noise-scale estimate), which
`state_dict` lists for checkpoints."""
from __future__ import annotations

from ..config import TrainConfig
from ..schedules.batch import lr_factor_at, scale_lr
from ..schedules.lr import lr_at
from ..schedules.noise_scale import NoiseScaleEstimator


class StageSchedule:
    """`run_total`, `run_warmup`: the whole run's tokens and its (first stage's) warmup, the clock
    of one schedule over the run (train.lr_after_growth continue / rewarm); `grown`: the stage
    began with a growth (rewarm ramps only then). Single-stage runs: the stage is the run."""

    def __init__(self, t: TrainConfig, run_total: int = 0, run_warmup: int = 0, grown: bool = False):
        self.t = t
        self.mode = t.after_growth()
        self.run_total = int(run_total or t.tokens)
        self.run_warmup = int(run_warmup if run_total else t.warmup_tokens)
        self.grown = grown
        self.plan = t.batch_plan()
        self.adaptive = t.adaptive_plan() if t.adaptive_batch is not None else None
        self.batch = self.adaptive.min_batch if self.adaptive else self.plan.batch_at(0)
        self.noise = NoiseScaleEstimator(t.noise_scale_beta) if t.noise_scale else None

    def batch_for_next_step(self, stage_tokens: int) -> int:
        return self.batch if self.adaptive else self.plan.batch_at(stage_tokens)

    def lr_for_step(self, stage_tokens: int, batch: int, run_tokens: int | None = None) -> float:
        """LR of the step that starts at `stage_tokens` (`run_tokens` in the whole run, growth fits
        included), evaluated at its end (no zero-LR first step)."""
        t = self.t
        step = batch * t.seq_len
        end = stage_tokens + step
        if self.mode == "restart":
            base = self.base_lr(end, t.tokens, t.warmup_tokens)
        else:
            base = self.base_lr((stage_tokens if run_tokens is None else run_tokens) + step,
                                self.run_total, self.run_warmup)
            if self.mode == "rewarm" and self.grown and t.warmup_tokens and end < t.warmup_tokens:
                base *= end / t.warmup_tokens
        if self.adaptive:
            return base * scale_lr(1.0, t.global_batch, batch, t.lr_scaling)
        return base * lr_factor_at(self.plan, stage_tokens, t.global_batch, t.lr_scaling)

    def base_lr(self, pos: float, total: float, warmup: float) -> float:
        """The schedule's LR at token `pos` of a schedule `total` tokens long (before batch scaling)."""
        t = self.t
        return lr_at(t.lr_schedule, pos, total, t.lr, warmup, t.min_lr_ratio, t.decay_fraction, t.decay_shape)

    def after_step(self, step: int) -> None:
        """The adaptive batch follows the noise scale every `adaptive_batch.every` steps."""
        if self.adaptive and step % int(self.t.adaptive_batch.get("every", 10)) == 0:
            self.batch = self.adaptive.propose(self.noise.b_simple, self.batch)

    def state_dict(self) -> dict:
        return {"batch": self.batch, "noise_scale": self.noise.state_dict() if self.noise is not None else None}

    def load_state_dict(self, st: dict) -> None:
        self.batch = st.get("batch", self.batch)
        if self.noise is not None and st.get("noise_scale"):
            self.noise.load_state_dict(st["noise_scale"])

    def __repr__(self) -> str:
        return repr(self.plan)
