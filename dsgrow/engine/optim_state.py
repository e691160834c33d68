"""Adam's state across a growth boundary under ZeRO-0/1/2/3 (`grow.optimizer: transfer`).

Reading: `safe_get_full_optimizer_state` per parameter, a collective under every ZeRO stage, so
all ranks walk the parameters in the same order (like gather_fp32_state_dict).

Writing into a NEW engine is the awkward part (checked on DeepSpeed 0.19, see
deepspeed-facts.md): torch's Adam creates its state lazily at the first step, so a fresh engine
has none, and DeepSpeed's setters need it. ZeRO-1/2 link each parameter's fragment of the state
only after the first step (`_lazy_init_hp_params_optimizer_state`). So `prime_adam_state` creates
the state the way Adam would (zeros, with the carried step count) on the flat fp32 partitions
DeepSpeed's optimizer holds, links the fragments (`_link_fragments`: DeepSpeed's own linking
misses every param group but the first), and only then are the moments written:
ZeRO-1/2 through `safe_set_full_optimizer_state` (each rank keeps its fragment), ZeRO-3 through
`safe_set_local_optimizer_state` with this rank's padded slice (the full setter narrows past the
end of a parameter whose size the world size does not divide).
"""
from __future__ import annotations

from typing import Callable

import torch

from .grow_io import rank_slice, rank_world

KEYS = ("exp_avg", "exp_avg_sq")


def base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer; stage 0 does not


def _flat_partitions(engine) -> list:
    """The fp32 tensors the torch optimizer's state is keyed by."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(opt.fp32_partitioned_groups_flat)
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return list(opt.single_partition_of_fp32_groups)
    if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optimizer"):
        return [p for g in opt.param_groups for p in g["params"]]  # no ZeRO, fp32: the module's params
    # e.g. DeepSpeed's BF16_Optimizer (ZeRO-0 in bf16): not covered by the tests, so not guessed at
    raise ValueError(f"optimizer transfer: {type(opt).__name__} is not supported; use ZeRO stage 1, 2 or 3")


def check_supported(engine) -> None:
    """ValueError unless Adam's state of this engine (and of a new one built alike) can be written."""
    base = base_optimizer(engine)
    if not isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"optimizer transfer supports torch Adam/AdamW, the engine has {type(base).__name__}")
    _flat_partitions(engine)  # a ZeRO wrapper whose state layout is known


def _link_fragments(engine) -> None:
    """ZeRO-1/2: point every parameter's optimizer-state fragment at the current state.

    DeepSpeed links them once, right after the FIRST param group's first Adam step, when the
    other groups have no state yet: their parameters (our no-decay group: biases, norms) stay
    unlinked and safe_get/set_full_optimizer_state raise "exp_avg not found in optimizer state
    fragment" (DeepSpeed 0.19). Re-linking once every group has state fixes that."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def step_count(engine) -> int:
    """Adam's step count (the same for every parameter: all are updated every step)."""
    base = base_optimizer(engine)
    steps = {int(base.state[p]["step"]) for p in _flat_partitions(engine) if "step" in base.state.get(p, {})}
    if len(steps) != 1:
        raise ValueError(f"optimizer state has step counts {sorted(steps)}; expected one")
    return steps.pop()


def gather_moments(engine) -> dict:
    """{"exp_avg": {name: full fp32 tensor}, "exp_avg_sq": {...}, "step": int} on every rank,
    one parameter gathered at a time."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _link_fragments(engine)
    out: dict = {k: {} for k in KEYS}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        for key in KEYS:
            full = safe_get_full_optimizer_state(p, key)
            if full is None:  # no ZeRO: the torch optimizer's own state
                full = base_optimizer(engine).state[p][key]
            out[key][name] = full.detach().to("cpu", torch.float32).clone()
    out["step"] = step_count(engine)
    return out


def prime_adam_state(engine, step: int) -> None:
    """Adam's state on a fresh engine: zero moments and step count `step`, linked for the setters."""
    check_supported(engine)
    base = base_optimizer(engine)
    for flat in _flat_partitions(engine):
        if base.state.get(flat):
            raise ValueError("the engine already has optimizer state; prime a fresh engine only")
        # The step lives on the CPU as a float32 scalar tensor, as torch's Adam keeps it by default.
        base.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                            "exp_avg_sq": torch.zeros_like(flat)}
    _link_fragments(engine)


def write_moments(engine, key: str, full: Callable[[str], torch.Tensor]) -> int:
    """Set optimizer state `key` of every parameter to `full(name)` (whole tensor, fp32, CPU);
    returns the elements this rank wrote."""
    from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

    rank, _ = rank_world()
    base = base_optimizer(engine)
    written = 0
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        value = full(name)
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(value.shape) != shape:
            raise ValueError(f"moments of {name}: shape {list(value.shape)}, model has {list(shape)}")
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's slice, zero-padded like the weights
            chunk, n = rank_slice(value.float(), p.ds_tensor.numel(), rank)
            safe_set_local_optimizer_state(p, chunk.to(p.ds_tensor.device), key)
            written += n
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2: each rank keeps its own fragment
            safe_set_full_optimizer_state(p, value.to(p.device), key)
            written += p._hp_mapping.lp_fragment_address.numel if p._hp_mapping is not None else 0
        else:
            base.state[p][key].copy_(value.to(p.device))
            written += value.numel()
    return written


__all__ = ["KEYS", "gather_moments", "prime_adam_state", "write_moments", "step_count", "check_supported", "base_optimizer"]
