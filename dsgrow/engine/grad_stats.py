"""Squared gradient norms at two batch sizes, for the gradient noise scale, under any ZeRO stage.

B_big: the global batch. Its gradient norm is the one DeepSpeed computes for clipping
(`engine.get_global_grad_norm()`, the averaged gradient over all ranks and micro-batches).
B_small: one micro-batch on one rank. ZeRO-2/3 reduce and partition gradients inside backward
hooks, so the local micro-batch gradient never sits in `.grad`. A tensor hook on each parameter
sees it first: autograd calls it with the parameter's full gradient for this backward only,
before it is accumulated or reduced. The squared norms are summed on the device (no host sync)
and only while a measurement is on.
"""
from __future__ import annotations

from typing import Optional

import torch


class MicroBatchGradNorm:
    def __init__(self, module: torch.nn.Module):
        self.active = False
        self._sq: Optional[torch.Tensor] = None
        self._handles = [p.register_hook(self._hook) for p in module.parameters() if p.requires_grad]

    def _hook(self, grad: torch.Tensor):
        if self.active:
            sq = grad.detach().float().pow(2).sum()
            self._sq = sq if self._sq is None else self._sq + sq
        return None

    def start(self) -> None:
        self.active = True
        self._sq = None

    def take(self) -> float:
        """Squared norm of the gradients seen since `start` (one micro-batch), then reset."""
        value = float(self._sq) if self._sq is not None else 0.0
        self._sq = None
        return value

    def stop(self) -> None:
        self.active = False
        self._sq = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def global_grad_norm(engine) -> Optional[float]:
    """Norm of the global-batch gradient from the last optimizer step (before clipping)."""
    n = engine.get_global_grad_norm()
    if n is None:
        return None
    return float(n)


def loss_scale(engine) -> float:
    """fp16's dynamic loss scale (1 for fp32/bf16): the hook sees gradients of the scaled loss."""
    opt = getattr(engine, "optimizer", None)
    scale = getattr(opt, "cur_scale", None) or getattr(getattr(opt, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale else 1.0
