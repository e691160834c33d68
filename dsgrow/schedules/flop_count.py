"""Counting the FLOPs that ran with torch's FlopCounterMode, attention included on CPU.

torch's counter has formulas for the CUDA attention kernels (flash, efficient, cuDNN) but not for
the CPU one that `scaled_dot_product_attention` dispatches to
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward), so on CPU it counts an
SDPA model's attention as 0 FLOPs. `count_flops` registers formulas for those two ops (once) and
counts. The formulas follow torch's own for the GPU kernels, with the query's head count (a GQA
call may pass fewer key / value heads): forward QK^T and PV, 2 * 2 * b * h * s_q * s_k * d; the
backward's four matmuls, twice that. A causal mask is not halved (the kernels' cost and the
12 * layers * d * seq term of schedules/flops.py count the full square too).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

_REGISTERED = False


def _attention_fwd(query_shape, key_shape, value_shape) -> int:
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


def register_cpu_attention() -> None:
    """Teach FlopCounterMode the CPU SDPA ops (idempotent; a no-op where torch lacks them)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd.default not in flop_registry and fwd not in flop_registry:
        @register_flop_formula(fwd)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return _attention_fwd(query_shape, key_shape, value_shape)

    if bwd is not None and bwd.default not in flop_registry and bwd not in flop_registry:
        @register_flop_formula(bwd)
        def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                               **kwargs) -> int:
            return 2 * _attention_fwd(query_shape, key_shape, value_shape)

    _REGISTERED = True


def count_flops(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), FLOPs it ran) under FlopCounterMode, SDPA on CPU counted."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, float(counter.get_total_flops())
