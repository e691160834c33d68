"""How a user's DeepSpeed engine was built, read off the live engine, to build the grown one alike.

A growth replaces the model, so a new engine is unavoidable (ZeRO's flat fp32 partitions and
Adam's state are sized by the old model). What the user chose must survive it: the ds_config as
given, the optimizer class (a torch optimizer passed to `deepspeed.initialize(optimizer=...)`,
or the ds_config's own `optimizer` section), every param group's hyperparameters at their
current values (LR included), the user's split of parameters into groups (e.g. no weight decay on
norms and biases), frozen parameters, the LR scheduler and the step counters.

The split is carried by parameter *name pattern*: a grown model has new layers (h.5 where the
small one stopped at h.3) but the same kinds of tensors, so `h.*.ln_1.weight` goes to the group
every small `h.N.ln_1.weight` was in. A split that depends on the layer index (layer-wise LR
decay) has no such image and is refused: pass `build_engine` then.

Everything here is read before the old engine is touched; errors are one line (GrowthError).
"""
from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..growth.ops import GrowthError
from .optim_state import base_optimizer

_LAYER_INDEX = re.compile(r"\.\d+\.")


def name_pattern(name: str) -> str:
    """`transformer.h.3.ln_1.weight` -> `transformer.h.*.ln_1.weight` (layer index erased)."""
    return _LAYER_INDEX.sub(".*.", name)


def _original_groups(opt) -> list[tuple[int, list]]:
    """[(param group index, the module parameters in it)] for DeepSpeed's optimizer wrappers, which
    replace each group's params with flat fp32 partitions and keep the originals elsewhere."""
    if hasattr(opt, "sub_group_to_group_id") and hasattr(opt, "fp16_groups"):  # ZeRO-3: sub-groups
        return [(opt.sub_group_to_group_id[i], list(g)) for i, g in enumerate(opt.fp16_groups)]
    for attr in ("bit16_groups", "bf16_groups", "fp16_groups"):  # ZeRO-1/2, BF16_Optimizer, FP16
        if hasattr(opt, attr):
            return [(i, list(g)) for i, g in enumerate(getattr(opt, attr))]
    return [(i, list(g["params"])) for i, g in enumerate(opt.param_groups)]  # a plain torch optimizer


@dataclass
class EngineRecipe:
    """Everything needed to build an engine like the user's around another model."""

    ds_config: dict
    optimizer_cls: Optional[type]
    """The client torch optimizer's class; None when the ds_config's `optimizer` section built it."""
    optimizer_kwargs: dict
    group_hparams: list[dict]
    """Per param group: every setting but `params`, at its current value."""
    group_of: dict[str, int]
    """Name pattern -> param group index."""
    frozen: set = field(default_factory=set)
    """Name patterns of parameters without gradients."""
    lr_scheduler: Optional[Callable] = None
    """A callable optimizer -> scheduler (the user's, as given to deepspeed.initialize)."""
    scheduler_state: Optional[dict] = None
    counters: dict = field(default_factory=dict)
    kept: list = field(default_factory=list)
    """Indices of the groups the grown model has parameters in (set by param_groups)."""

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """The grown model's parameters in the user's groups, with the groups' settings."""
        groups = [{**h, "params": []} for h in self.group_hparams]
        for name, p in model.named_parameters():
            pat = name_pattern(name)
            if pat in self.frozen:
                p.requires_grad_(False)
                continue
            if pat not in self.group_of:
                raise GrowthError(f"grown parameter {name} matches no parameter of the small model")
            groups[self.group_of[pat]]["params"].append(p)
        self.kept = [i for i, g in enumerate(groups) if g["params"]]  # DeepSpeed takes no empty group
        return [groups[i] for i in self.kept]

    def build(self, model: torch.nn.Module):
        """deepspeed.initialize around `model`, as the user's engine was built."""
        import deepspeed

        groups = self.param_groups(model)
        cfg = copy.deepcopy(self.ds_config)
        if self.optimizer_cls is None:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg,
                                              lr_scheduler=self.lr_scheduler)
        else:
            opt = self.optimizer_cls(groups, **self.optimizer_kwargs)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, lr_scheduler=self.lr_scheduler)
        self.restore_progress(engine)
        return engine

    def restore_progress(self, engine) -> None:
        """The step counters (the accumulation boundary is `(micro_steps + 1) % gas`) and the LR
        scheduler's position, so the user's loop and schedule go on where they were."""
        for k, v in self.counters.items():
            setattr(engine, k, v)
        if self.scheduler_state is not None and engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(copy.deepcopy(self.scheduler_state))
            # A scheduler writes its step-0 LR into the groups when built; they go on at the LR
            # they had, and the scheduler's next step continues from the loaded position.
            for g, i in zip(base_optimizer(engine).param_groups, self.kept):
                g["lr"] = self.group_hparams[i]["lr"]


def _init_kwargs(cls: type, defaults: dict) -> dict:
    """The optimizer's defaults that its constructor takes (torch adds a few it does not)."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in params}


def capture(engine, lr_scheduler: Optional[Callable] = None) -> EngineRecipe:
    """Read how `engine` was built; GrowthError (one line) where it cannot be rebuilt alike."""
    if engine.optimizer is None:
        raise GrowthError("the engine has no optimizer (built for inference?); nothing to train after growth")
    cfg = copy.deepcopy(getattr(engine._config, "_param_dict", None) or engine.config)
    if not isinstance(cfg, dict):
        raise GrowthError("cannot read the engine's ds_config; pass ds_config=")
    base = base_optimizer(engine)
    client = engine.client_optimizer
    if client is not None and not isinstance(client, torch.optim.Optimizer):
        # A callable optimizer factory: DeepSpeed called it with the parameters; the class is what it built.
        client = base
    cls = type(base) if client is not None else None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    group_of: dict[str, int] = {}
    for gi, params in _original_groups(engine.optimizer):
        for p in params:
            pat = name_pattern(names.get(id(p), ""))
            if group_of.setdefault(pat, gi) != gi:
                raise GrowthError(f"the optimizer's param groups split {pat} by layer (e.g. layer-wise LR); "
                                  "its image in the grown model is not defined: pass build_engine=")
    frozen = {name_pattern(n) for n, p in engine.module.named_parameters() if not p.requires_grad}
    missing = sorted({name_pattern(n) for n, p in engine.module.named_parameters() if p.requires_grad}
                     - set(group_of))
    if missing:
        raise GrowthError(f"parameter {missing[0]} is in no optimizer param group; pass build_engine=")
    hparams = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in base.param_groups]
    sched, state = lr_scheduler, None
    if engine.lr_scheduler is not None:
        client_sched = engine.client_lr_scheduler
        if client_sched is not None and not callable(client_sched) and sched is None:
            raise GrowthError("the engine's LR scheduler was passed as an object bound to the old optimizer; "
                              "pass lr_scheduler=<callable optimizer -> scheduler> to grow_engine "
                              "(or to deepspeed.initialize)")
        if sched is None and client_sched is not None:
            sched = client_sched
        state = copy.deepcopy(engine.lr_scheduler.state_dict())
    counters = {k: getattr(engine, k) for k in ("global_steps", "global_samples", "micro_steps") if hasattr(engine, k)}
    return EngineRecipe(cfg, cls, _init_kwargs(cls, base.defaults) if cls else {}, hparams, group_of, frozen,
                        sched, state, counters)


__all__ = ["EngineRecipe", "capture", "name_pattern"]
