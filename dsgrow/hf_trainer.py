"""Growth for Hugging Face `transformers.Trainer` users (DeepSpeed via `TrainingArguments(deepspeed=...)`).

The Trainer owns its DeepSpeed engine and builds it inside `train()`, so a growth cannot swap the
engine under a running Trainer. The route: a callback stops training at the growth step, the
grown model is made from the Trainer's live engine by the same `grow_engine` path (the engine's
fp32 master weights, under any ZeRO stage, written straight into the large model's shards), and
a new Trainer trains it:

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GrowAtStep(1000)])
    trainer.train()                                       # stops after step 1000
    big, report = grow_trainer_model(trainer, {"layers": 8, "hidden": 256}, method="fpi")
    Trainer(big, args2, train_dataset=ds).train()         # args2: the rest of the run

What carries over: the weights (grown), the model's HF config (every field but the sizes), and the
DeepSpeed config (the new Trainer's args decide it). What does not: the optimizer state (the new
Trainer builds a fresh optimizer; `optimizer="transfer"` is refused here), the LR scheduler and
the global step (give the new Trainer the remaining steps and a warmup in its own arguments),
and the data order (pass the new Trainer the data it has not seen, or seed it differently).
A muP model (`dsgrow.mup_model`) comes back muP at the grown width; give the new Trainer its
muP optimizer, `optimizers=(torch.optim.AdamW(dsgrow.mup_param_groups(big, wd, lr=lr)), None)`:
the Trainer's own optimizer would train every tensor at one LR.
"""
from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .growth.ops import GrowthError


class GrowAtStep(TrainerCallback):
    """Stops `Trainer.train()` once `state.global_step` reaches `step` (no checkpoint is forced)."""

    def __init__(self, step: int):
        if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
            raise ValueError(f"GrowAtStep: step must be a positive integer, got {step!r}")
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def grow_trainer_model(trainer, target, method: str = "fpi", **kwargs: Any):
    """The grown HF model made from `trainer`'s DeepSpeed engine (after `train()` returned), and the
    GrowthReport. The old engine is freed: `trainer` cannot train on. Under ZeRO-3 the model comes
    back partitioned (built under zero.Init, each rank holding its slice), ready for a new Trainer
    with the same DeepSpeed config. Every rank calls this."""
    from .engine.grow import grow_engine, keep_model

    if kwargs.get("optimizer", "reset") != "reset":
        raise GrowthError("grow_trainer_model: the HF Trainer builds its own optimizer, so optimizer state "
                          "cannot be carried over; use optimizer='reset'")
    if "build_engine" in kwargs:
        raise GrowthError("grow_trainer_model: the new Trainer builds the engine; build_engine is not taken here")
    engine = getattr(trainer, "model_wrapped", None)
    if not getattr(trainer, "is_deepspeed_enabled", False) or not hasattr(engine, "zero_optimization_stage"):
        raise GrowthError("grow_trainer_model: the Trainer has no DeepSpeed engine (set TrainingArguments("
                          "deepspeed=...) and call trainer.train() first)")
    model, report = grow_engine(engine, target, method, build_engine=keep_model, **kwargs)
    trainer.model = trainer.model_wrapped = trainer.deepspeed = None  # the old engine is gone
    return model, report


__all__ = ["GrowAtStep", "grow_trainer_model"]


class SubnetworkCallback(TrainerCallback):
    """Evolving subnetwork training under `Trainer`: each optimizer step trains that step's sampled
    subnetwork (dsgrow.Subnetwork), its phase following `state.global_step / state.max_steps`;
    evaluation and saving see the full model.

        cb = SubnetworkCallback({"method": "est"}, seed=0)
        trainer = Trainer(model, args, train_dataset=ds, callbacks=[cb])
        cb.trainer = trainer        # needed under ZeRO-3 only (the engine clears unused grads)
        trainer.train()
    """

    def __init__(self, config=None, seed: int = 0, trainer=None):
        from .subnet import est_config

        self.config, self.seed, self.trainer = est_config(config if config is not None else {}), seed, trainer
        self.est = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.est is None:
            from .subnet import Subnetwork

            wrapped = getattr(self.trainer, "model_wrapped", None) if self.trainer is not None else None
            self.est = Subnetwork(wrapped if hasattr(wrapped, "optimizer") else model, self.config, seed=self.seed)
        self.est.begin(state.global_step, state.global_step / max(state.max_steps, 1))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.est is not None:
            self.est.end()
        return control
