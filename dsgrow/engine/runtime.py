"""The DeepSpeed glue: process group, model and engine construction, LR, gathering, teardown.

This is one of the two modules that import deepspeed (with checkpoint.py); everything above it
(train.py, the CLI) talks to the engine through these functions.
"""
from __future__ import annotations

import gc
import os
import socket
import warnings
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
import torch.distributed as dist

from ..families import mup
from ..families.hf_io import hf_model_class
from ..families.spec import ModelSpec

# DeepSpeed's gloo path uses all_gather_into_tensor, which torch 2.13 marks deprecated once per
# call: thousands of identical lines per run that hide real warnings.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*", category=FutureWarning)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_gpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


_SELF_MADE: dict = {}  # the env init_distributed exported for a world of one it created itself


def init_distributed(timeout_s: Optional[float] = None) -> tuple[int, int, int]:
    """Join (or, run as a plain `python` script, create) the process group; returns rank, world, local rank.

    The deepspeed launcher, torchrun and srun wrappers all export RANK/WORLD_SIZE/MASTER_*; a
    single process started by hand has none, so it becomes a world of one on a free local port.
    """
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        made = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        os.environ.update(made)
        _SELF_MADE.update(made)
    if not dist.is_initialized():
        backend = "nccl" if has_gpu() else "gloo"
        kwargs = {}
        if timeout_s is not None:  # a collective waiting longer than this raises instead of hanging
            from datetime import timedelta

            kwargs["timeout"] = timedelta(seconds=timeout_s)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **kwargs)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if has_gpu():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def end_distributed(wait: bool = True) -> None:
    """Leave and destroy the process group, whoever made it: for a script about to exit
    (launchers/pretrain.py, a test driver). Left to interpreter teardown, the gloo group's destructor
    runs during finalisation and sometimes aborts a rank after all its work is done ("terminate
    called without an active exception", SIGABRT: 3 of 28 runs of tests/drivers/est_zero.py on a
    2-core CPU, torch 2.13; 0 of 50 with this call at its end), and the job reports failure.

    `wait`: a barrier first, so no rank leaves while a peer still talks to it; pass False after a
    failure, where a peer may be gone and the barrier would wait for it until the group's timeout."""
    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def release_distributed() -> None:
    """Undo a world of one that init_distributed made itself (a run started from Python, not by a
    launcher): destroy the process group, whose store keeps listening on MASTER_PORT, and remove the
    env it exported, which child processes would inherit and then fail to bind that port. A
    launcher's group and env are the launcher's: left alone."""
    if not _SELF_MADE:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in _SELF_MADE.items():
        if os.environ.get(key) == value:
            del os.environ[key]
    _SELF_MADE.clear()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_mean(value: float) -> float:
    """Mean of a float over ranks (gloo on CPU needs a CPU tensor, nccl a GPU one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def broadcast_object(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def build_model(spec: ModelSpec, ds_cfg: dict, seed: int, init_from: Optional[str] = None, hf_config=None,
                model_class=None) -> torch.nn.Module:
    """The HF model of `spec` (or of `hf_config`, as `model_class`) built for a DeepSpeed config.

    Under ZeRO-3 the model is built inside zero.Init via transformers' integration: a bare
    `zero.Init()` around a transformers 5 constructor initialises shards wrongly (embedding std
    1.0, initial loss ~8x ln(vocab); see deepspeed-facts.md), the integration initialises each
    module before partitioning it. The init draws from its own RNG stream (`seed`): the caller's
    RNG state is left as it was, so a user's loop is not perturbed by a growth.
    """
    zero3 = ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3
    cfg = hf_config if hf_config is not None else spec.to_hf_config()

    def build():
        if init_from is not None:
            # Under ZeRO-3, transformers loads each rank's slices straight into the partitions.
            return hf_model_class(spec).from_pretrained(init_from, local_files_only=True, dtype=torch.float32)
        if model_class is not None:
            return model_class._from_config(cfg, dtype=torch.float32)
        return hf_model_class(spec).from_config(cfg)

    # An exported model is SP (dsgrow folds muP away on export); a muP recipe starting from one
    # gets its weights unfolded into muP's (same function) and written like a growth's.
    unfold_from = init_from if init_from is not None and spec.mup and _is_folded(init_from) else None
    if unfold_from is not None:
        init_from = None
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), hf_zero_init(ds_cfg if zero3 else None):
        torch.manual_seed(seed)  # every rank builds the same initial weights
        model = mup.prepare(build(), fresh=init_from is None and unfold_from is None)
    if unfold_from is not None:
        from ..families import from_canonical, load_hf_dir
        from .grow_io import write_weights

        _, canonical = load_hf_dir(unfold_from)
        sd = from_canonical(spec, mup.unfold(spec, canonical))
        write_weights(model, sd.__getitem__)
    return model


def _is_folded(path: str) -> bool:
    """Whether an HF model dir holds a standard-parametrised model (no dsgrow_mup in its config)."""
    import json

    with open(os.path.join(path, "config.json")) as f:
        return mup.MUP_CONFIG_KEY not in json.load(f)


@contextmanager
def hf_zero_init(ds_cfg: Optional[dict]):
    """transformers builds every model under zero.Init while a ZeRO-3 HfDeepSpeedConfig is alive.
    Inside: `ds_cfg`'s (None: no config, a plain model). After: whatever was alive before (the HF
    Trainer's TrainingArguments keep one). Left set, a later `from_config` on rank 0 alone (an
    export, a CPU copy) would enter zero.Init, a collective the other ranks never join."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    live = ref() if ref is not None else None
    hf_ds.unset_hf_deepspeed_config()
    mine = hf_ds.HfDeepSpeedConfig(ds_cfg) if ds_cfg is not None else None  # transformers keeps a weak ref
    try:
        yield
    finally:
        del mine
        hf_ds.unset_hf_deepspeed_config()
        if live is not None:
            hf_ds.set_hf_deepspeed_config(live)


def param_groups(model: torch.nn.Module, weight_decay: float, lr: Optional[float] = None) -> list[dict]:
    """Decay matrices and embeddings; never biases or norm gains (their shapes are 1-D). A muP
    model's groups also carry its LR multipliers (families/mup.py), each group starting at
    lr x its multiplier when `lr` is given."""
    if mup.spec_of_config(getattr(model, "config", None)) is not None:
        return mup.param_groups(model, weight_decay, lr=lr)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 params are empty; ds_shape is the real one
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, ds_cfg: dict, lr: float, betas, eps: float, weight_decay: float):
    """deepspeed.initialize with a torch AdamW unless the ds_config names its own optimizer
    (zero3_offload needs DeepSpeed's CPU Adam, which it picks itself)."""
    import deepspeed

    groups = param_groups(model, weight_decay, lr=lr)
    if "optimizer" in ds_cfg:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    return engine


def set_train_batch_size(engine, batch: int) -> None:
    """Global batch for the next optimizer step (changes gradient accumulation only)."""
    if engine.train_batch_size() != batch:
        engine.set_train_batch_size(batch)


def set_lr(engine, lr: float) -> None:
    """The schedule's LR into every param group, times the group's own `lr_scale` (muP's 1/m)."""
    for g in engine.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def gather_fp32_state_dict(engine, all_ranks: bool = False) -> Optional[dict[str, torch.Tensor]]:
    """The full fp32 master weights, parameter by parameter; the dict on rank 0 (on every rank
    with `all_ranks`), None elsewhere.

    safe_get_full_fp32_param reads the optimizer's fp32 master copy (not the bf16 module weight)
    and is a collective under ZeRO-3, so every rank walks the parameters in the same order.
    Only one full tensor is gathered at a time.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    rank = rank_world()[0]
    out: Optional[dict] = {} if rank == 0 or all_ranks else None
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:  # no optimizer state (frozen param): the module weight is the truth
            with gathered([p]):
                full = p.detach().float().clone()
        if out is not None:
            out[name] = full.detach().to("cpu", torch.float32).clone()
    return out


def gathered(params, modifier_rank=None):
    """GatheredParameters for ZeRO-3 params; a no-op context otherwise."""
    import deepspeed

    if any(hasattr(p, "ds_id") for p in params):
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return nullcontext()


def params_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter element this rank holds (its ZeRO-3 shard, or the whole tensor)
    is finite. One pass over the weights; called before a checkpoint or an export."""
    with torch.no_grad():
        for p in model.parameters():
            t = p.ds_tensor if hasattr(p, "ds_tensor") else p
            if t.numel() and not bool(torch.isfinite(t).all()):
                return False
    return True


def local_param_fraction(model: torch.nn.Module) -> float:
    """Share of the model's parameter elements this rank holds (about 1/world under ZeRO-3)."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local / max(total, 1)


def destroy_engine(engine) -> None:
    """Free the engine's tensors so a next, larger engine fits (see deepspeed-facts.md)."""
    try:
        engine.destroy()
    except Exception:  # older engines have no destroy(); dropping references still frees them
        pass
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def clear_unused_grads(engine, params) -> int:
    """Zero ZeRO-3's reduced-gradient partitions of `params`, parameters this step will not use.

    ZeRO-3 keeps each parameter's gradient partition in a buffer that it overwrites (first
    micro-batch) or adds to only when that parameter receives a gradient; a parameter that takes
    no part in a step (a layer EST skips) would have its previous step's gradient applied again
    and counted in the clipping norm (measured: tests/test_est.py). Zeroed before the step's first
    backward, its gradient is zero, as under ZeRO-0/1/2. Returns the elements zeroed (0 if the
    engine is not ZeRO-3, or keeps its gradients elsewhere, e.g. offloaded)."""
    buffers = getattr(engine.optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)
    if buffers is None:
        return 0
    n = 0
    for p in params:
        g = buffers.get(getattr(p, "ds_id", None))
        if g is not None:
            g.zero_()
            n += g.numel()
    return n
