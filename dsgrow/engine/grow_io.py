"""Moving weights across a growth boundary under any ZeRO stage.

The grown weights are written into the freshly built large model BEFORE deepspeed.initialize:
the engine's fp32 master copies are made from the module then, so they equal the grown weights
exactly; writing after initialize would be undone by the next optimizer step
(deepspeed-facts.md). Under ZeRO-3 each rank writes only its own slice of each parameter
(`p.ds_tensor`, flat elements [r*ps, (r+1)*ps), zero padding past the end): no gather, no
broadcast.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .runtime import rank_world


def rank_slice(value: torch.Tensor, part: int, rank: int) -> tuple[torch.Tensor, int]:
    """ZeRO-3's partition `rank` of the full tensor `value`: flat elements [rank*part, (rank+1)*part),
    zero-padded past the end; and how many of them are real."""
    real = value.reshape(-1)[rank * part:(rank + 1) * part]
    chunk = torch.zeros(part, dtype=value.dtype)
    chunk[:real.numel()] = real
    return chunk, real.numel()


def write_weights(model: torch.nn.Module, full: Callable[[str], torch.Tensor]) -> int:
    """Write `full(name)` (the whole tensor, fp32, on CPU) into every parameter of `model`.

    Returns the number of elements this rank wrote. `full` is called once per parameter, in
    order, so a caller can materialise one tensor (or one layer) at a time.
    """
    rank, _ = rank_world()
    written = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = full(name)
            if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition only
                shard = p.ds_tensor
                if tuple(value.shape) != tuple(p.ds_shape):
                    raise ValueError(f"grown weight {name}: shape {list(value.shape)}, model has {list(p.ds_shape)}")
                chunk, n = rank_slice(value, shard.numel(), rank)
                shard.copy_(chunk.to(shard.dtype))
                written += n
            else:
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"grown weight {name}: shape {list(value.shape)}, model has {list(p.shape)}")
                p.copy_(value.to(p.dtype))
                written += p.numel()
    return written


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average gradients over the data-parallel ranks in place (the growth fit's optimizer)."""
    rank, world = rank_world()
    if world == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world)
