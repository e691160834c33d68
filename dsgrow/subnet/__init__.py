"""Subnetwork training: each optimizer step trains a sampled subnetwork of the model (EST).

In your own loop (a DeepSpeed engine, or a plain torch model)::

    est = dsgrow.Subnetwork(engine, {"method": "est"}, seed=0)
    for step in range(steps):
        with est.active(step, fraction=step / steps):   # the phase follows the tokens seen
            for micro in micro_batches:
                engine.backward(engine(**micro).loss)
                engine.step()
    # outside `active` the model is the full model (evaluate, save, export as usual)

The dsgrow trainer does the same from `train: {subnetwork: {method: est}}` (est.py: the schedule
and its defaults; slicing.py: how a step computes only the subnetwork).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from ..families.spec import ModelSpec
from .est import EstConfig, EstPhase, counts, draw, est_config, flops_per_token, mean_flops_per_token
from .slicing import Sample, SlicedModel, SubnetError

__all__ = ["Subnetwork", "EstConfig", "EstPhase", "Sample", "SubnetError", "est_config", "draw", "counts",
           "flops_per_token", "mean_flops_per_token"]


class Subnetwork:
    """EST over a GPT-2 / LLaMA model: a DeepSpeed engine, or an HF model outside ZeRO-3."""

    def __init__(self, model, config=None, seed: int = 0, spec: Optional[ModelSpec] = None):
        """`model`: a DeepSpeed engine (required under ZeRO-3), or an HF model / engine.module."""
        self.engine = model if hasattr(model, "module") and hasattr(model, "optimizer") else None
        module = self.engine.module if self.engine is not None else model
        if self.engine is None and any(hasattr(p, "ds_id") for p in module.parameters()):
            raise SubnetError("subnetwork training under ZeRO-3: pass the DeepSpeed engine, not engine.module "
                              "(the skipped layers' gradient buffers are cleared through it each step)")
        self.cfg: EstConfig = est_config(config if config is not None else {})
        self.spec = spec if spec is not None else ModelSpec.from_hf_config(module.config)
        self.seed = int(seed)
        self.sliced = SlicedModel(module, self.spec)

    def sample(self, step: int, fraction: float) -> Optional[Sample]:
        """The subnetwork of optimizer step `step` at `fraction` of the tokens (None: the full model)."""
        return draw(self.spec, self.cfg.phase_at(fraction), self.seed, step, self.cfg.scale)

    def flops_per_token(self, fraction: float, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token of what runs at `fraction` of the tokens."""
        return flops_per_token(self.spec, seq_len or self.spec.max_seq_len, self.cfg.phase_at(fraction))

    def begin(self, step: int, fraction: float) -> Optional[Sample]:
        """Make the model step `step`'s subnetwork (call before the step's first forward)."""
        s = self.sample(step, fraction)
        if s is None:
            self.sliced.clear()
            return s
        self.sliced.apply(s)
        if self.engine is not None and len(s.layers) < self.spec.layers:
            from ..engine.runtime import clear_unused_grads

            skipped = set(range(self.spec.layers)) - set(s.layers)
            clear_unused_grads(self.engine, [p for i in sorted(skipped) for p in self.sliced.blocks[i].parameters()])
        return s

    def end(self) -> None:
        self.sliced.clear()

    @contextmanager
    def active(self, step: int, fraction: float):
        """The model is step `step`'s subnetwork inside the block, the full model after it."""
        s = self.begin(step, fraction)
        try:
            yield s
        finally:
            self.end()
