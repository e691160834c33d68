"""One stage's batch size and LR: pure functions of the stage's tokens, plus the two pieces of
schedule state a run has (the adaptive batch and the gradient-noise-scale estimate), which
`state_dict` lists for checkpoints."""
from __future__ import annotations

from ..config import TrainConfig
from ..schedules.batch import lr_factor_at, scale_lr
from ..schedules.lr import warmup_cosine
from ..schedules.noise_scale import NoiseScaleEstimator


class StageSchedule:
    def __init__(self, t: TrainConfig):
        self.t = t
        self.plan = t.batch_plan()
        self.adaptive = t.adaptive_plan() if t.adaptive_batch is not None else None
        self.batch = self.adaptive.min_batch if self.adaptive else self.plan.batch_at(0)
        self.noise = NoiseScaleEstimator(t.noise_scale_beta) if t.noise_scale else None

    def batch_for_next_step(self, stage_tokens: int) -> int:
        return self.batch if self.adaptive else self.plan.batch_at(stage_tokens)

    def lr_for_step(self, stage_tokens: int, batch: int) -> float:
        """LR of the step that starts at `stage_tokens`, evaluated at its end (no zero-LR first step)."""
        t = self.t
        end = stage_tokens + batch * t.seq_len
        if t.lr_schedule == "cosine":
            base = warmup_cosine(end, t.tokens, t.lr, t.warmup_tokens, t.min_lr_ratio)
        else:
            base = t.lr * min(1.0, end / t.warmup_tokens) if t.warmup_tokens else t.lr
        if self.adaptive:
            return base * scale_lr(1.0, t.global_batch, batch, t.lr_scaling)
        return base * lr_factor_at(self.plan, stage_tokens, t.global_batch, t.lr_scaling)

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
