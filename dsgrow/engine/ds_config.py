"""Fill a DeepSpeed config's "auto" fields from the recipe, and refuse contradictions.

ds_configs/*.json hold engine settings only (ZeRO stage, buckets, offload). Batch sizes, gradient
accumulation, clipping, precision and optimizer hyper-parameters come from the recipe: a field
that is "auto" or absent is filled; an explicit value that disagrees with the recipe is an error,
because silently preferring either side trains a different run than the user thinks.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainConfig


def read_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ds_config not found: {p}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"ds_config {p}: expected a JSON object")
    return cfg


def zero_stage(cfg: dict) -> int:
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"ds_config zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ds_config zero_optimization.stage must be 0-3, got {stage!r}")
    return stage


def _fill(cfg: dict, dotted: str, value: Any, source: str) -> None:
    node = cfg
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    current = node.get(keys[-1], "auto")
    if current == "auto":
        node[keys[-1]] = value
        return
    same = current == value
    if isinstance(value, float) or isinstance(current, float):
        same = isinstance(current, (int, float)) and abs(float(current) - float(value)) <= 1e-12 * max(1.0, abs(value))
    if isinstance(value, list):
        same = list(current) == list(value)
    if not same:
        raise ConfigError(f"ds_config {dotted}={current!r} contradicts the recipe's {source}={value!r} "
                          f"(set it to \"auto\" or change the recipe)")


def fill_ds_config(cfg: dict, train: TrainConfig, world_size: int, precision: str) -> dict:
    """A copy of `cfg` with every recipe-owned field set; raises ConfigError on contradictions."""
    train.check_world(world_size)
    out = copy.deepcopy(cfg)
    zero_stage(out)
    if "scheduler" in out:
        raise ConfigError("ds_config has a 'scheduler' section: dsgrow schedules the LR by tokens itself; remove it")
    gas = train.global_batch // (train.micro_batch * world_size)
    _fill(out, "train_batch_size", train.global_batch, "train.global_batch")
    _fill(out, "train_micro_batch_size_per_gpu", train.micro_batch, "train.micro_batch")
    _fill(out, "gradient_accumulation_steps", gas, "train.global_batch / (train.micro_batch x ranks)")
    _fill(out, "gradient_clipping", float(train.grad_clip), "train.grad_clip")
    _fill(out, "bf16.enabled", precision == "bf16", "train.precision")
    _fill(out, "fp16.enabled", precision == "fp16", "train.precision")
    if "optimizer" in out:
        _fill(out, "optimizer.params.lr", float(train.lr), "train.lr")
        _fill(out, "optimizer.params.betas", [float(b) for b in train.betas], "train.betas")
        _fill(out, "optimizer.params.eps", float(train.eps), "train.eps")
        _fill(out, "optimizer.params.weight_decay", float(train.weight_decay), "train.weight_decay")
    # Metrics are dsgrow's job (tensorboard + JSONL); DeepSpeed's own monitors would write twice.
    out.setdefault("steps_per_print", 10**9)
    return out


def resolve_precision(requested: str, has_gpu: bool) -> str:
    if requested == "auto":
        return "bf16" if has_gpu else "fp32"
    return requested
