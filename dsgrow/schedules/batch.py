"""Global batch size as a pure function of tokens seen.

Units: a batch size is a number of sequences (samples) per optimizer step, across all ranks;
`tokens` is the training-token counter the run keeps (the only schedule state). The Megatron ramp
is written in samples there; feed it samples instead of tokens to reproduce Megatron exactly.

How the pieces compose in a training loop (done by the caller, nothing here holds state):

    b = schedule.batch_at(tokens)                          # sequences this step
    lr = base_lr_fn(tokens) * lr_factor_at(schedule, tokens, base_batch, rule)

The trainer applies `b` with engine.set_train_batch_size and sets the accumulation boundary
itself on every micro-step (deepspeed-facts.md: DeepSpeed's own boundary comes from a global
micro-step counter, which a changed accumulation count would misalign).

`lr_factor_at` folds together the two LR effects of a batch schedule: the scaling rule
(`scale_lr`: linear per Goyal et al. 2017, sqrt, or none) and the schedule's own LR multiplier,
which is 1 everywhere except for `GrowInsteadOfDecay`, where it carries the LR decays the batch can
no longer absorb (that schedule already encodes its LR/batch trade, so its rule must be "none").
"""
from __future__ import annotations

import bisect
import math
import re
from abc import ABC, abstractmethod
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .lr import step_decay_multiplier


class ScheduleError(ValueError):
    """A schedule, budget or plan that cannot work (one-line message naming the bad value)."""


# ----------------------------------------------------------------------------------------------
# Token counts with suffixes ("250B", "2M", "1_000", "1.5K", "2e6")
# ----------------------------------------------------------------------------------------------
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_tokens(value: Any, what: str = "tokens") -> int:
    """An integer count from an int, an integral float, or a string with an optional decimal
    K/M/B/T suffix (1K = 1000, as in Megatron's "250B"). Underscores are allowed. The sign is
    kept; callers check their own range. Raises ScheduleError naming `what` and the value."""
    if isinstance(value, bool):
        raise ScheduleError(f"{what}: expected a token count, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return int(value)
        raise ScheduleError(f"{what}: {value!r} is not a whole number")
    if not isinstance(value, str):
        raise ScheduleError(f"{what}: expected a token count, got {value!r}")
    text = value.strip().replace("_", "")
    suffix = text[-1:].upper() if text[-1:].isalpha() else ""
    number = text[: len(text) - len(suffix)]
    try:
        d = Decimal(number)
    except InvalidOperation:
        raise ScheduleError(f"{what}: cannot parse {value!r} (use an integer with an optional K/M/B/T suffix, e.g. 250B)") from None
    if suffix not in _SUFFIX:
        raise ScheduleError(f"{what}: bad suffix in {value!r} (use K, M, B or T, e.g. 250B)")
    d *= _SUFFIX[suffix]
    if not d.is_finite() or d != d.to_integral_value():
        raise ScheduleError(f"{what}: {value!r} is not a whole number of tokens")
    return int(d)


def format_tokens(n: int) -> str:
    """Shortest exact K/M/B/T spelling of an integer: 2000000 -> '2M', 1500 -> '1500'."""
    for suffix in ("T", "B", "M", "K"):
        unit = _SUFFIX[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and re.fullmatch(r"\s*[0-9_]+\s*", value):
            value = int(value.replace("_", ""))
        else:
            raise ScheduleError(f"{what} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ScheduleError(f"{what} must be a positive integer, got {value!r}")
    return value


def _check_tokens(tokens: int) -> None:
    if tokens < 0:
        raise ScheduleError(f"tokens must be >= 0, got {tokens}")


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------
class BatchSchedule(ABC):
    """Global batch size (sequences) as a function of tokens seen."""

    @abstractmethod
    def batch_at(self, tokens: int) -> int:
        """Global batch size for the step that starts after `tokens` tokens."""

    @abstractmethod
    def sizes(self) -> list[int]:
        """Every batch size this schedule can produce, ascending."""

    def change_points(self) -> list[int]:
        """Token counts at which batch_at (or lr_multiplier_at) may change value, ascending."""
        return []

    def lr_multiplier_at(self, tokens: int) -> float:
        """LR factor the schedule itself implies (1.0 except for GrowInsteadOfDecay)."""
        _check_tokens(tokens)
        return 1.0

    def validate(self, micro_batch: int, dp: int) -> None:
        """Every size must split into micro_batch x dp x gas; else ScheduleError naming the size."""
        micro_batch = _positive_int(micro_batch, "micro_batch")
        dp = _positive_int(dp, "dp")
        unit = micro_batch * dp
        for s in self.sizes():
            if s % unit:
                raise ScheduleError(
                    f"batch size {s} from {self} is not divisible by micro_batch {micro_batch} x dp {dp} = {unit}")


class Constant(BatchSchedule):
    def __init__(self, size: int):
        self.size = _positive_int(size, "batch size")

    def batch_at(self, tokens: int) -> int:
        _check_tokens(tokens)
        return self.size

    def sizes(self) -> list[int]:
        return [self.size]

    def __repr__(self) -> str:
        return f"Constant({self.size})"


class Ramp(BatchSchedule):
    """Megatron's `--rampup-batch-size START INCR RAMP`: global batch =
    start + increment * floor(tokens / (ramp_tokens / n_increments)), n_increments =
    (end - start) / increment, and `end` once tokens >= ramp_tokens.

    Integer arithmetic (floor(tokens * n / ramp_tokens)) instead of Megatron's float division, so
    the step points are exact: increment k starts at ceil(k * ramp_tokens / n) tokens.
    """

    def __init__(self, start: int, increment: int, ramp_tokens: Union[int, str], end: int):
        self.start = _positive_int(start, "ramp start")
        self.increment = _positive_int(increment, "ramp increment")
        self.end = _positive_int(end, "ramp end")
        self.ramp_tokens = parse_tokens(ramp_tokens, "ramp_tokens")
        if self.ramp_tokens <= 0:
            raise ScheduleError(f"ramp_tokens must be positive, got {ramp_tokens!r}")
        if self.end <= self.start:
            raise ScheduleError(f"ramp end ({self.end}) must be > start ({self.start}); use a constant batch")
        if (self.end - self.start) % self.increment:
            raise ScheduleError(
                f"ramp: end - start = {self.end - self.start} is not a multiple of increment {self.increment}")
        self.n_increments = (self.end - self.start) // self.increment

    def batch_at(self, tokens: int) -> int:
        _check_tokens(tokens)
        if tokens >= self.ramp_tokens:
            return self.end
        return self.start + self.increment * (tokens * self.n_increments // self.ramp_tokens)

    def sizes(self) -> list[int]:
        return [self.start + k * self.increment for k in range(self.n_increments + 1)]

    def change_points(self) -> list[int]:
        n, r = self.n_increments, self.ramp_tokens
        return [-(-k * r // n) for k in range(1, n + 1)]

    def __repr__(self) -> str:
        return f"Ramp(start={self.start}, increment={self.increment}, ramp_tokens={format_tokens(self.ramp_tokens)}, end={self.end})"


class Steps(BatchSchedule):
    """Piecewise-constant batch keyed by tokens, newer Megatron style: "0:768 250B:1536"."""

    def __init__(self, points: Union[Sequence[tuple[Any, Any]], Mapping[Any, Any]]):
        items = list(points.items()) if isinstance(points, Mapping) else list(points)
        if not items:
            raise ScheduleError("step schedule is empty (need at least '0:SIZE')")
        parsed: list[tuple[int, int]] = []
        for item in items:
            try:
                t, s = item
            except (TypeError, ValueError):
                raise ScheduleError(f"step schedule: expected (tokens, size) pairs, got {item!r}") from None
            tokens = parse_tokens(t, "step schedule tokens")
            if tokens < 0:
                raise ScheduleError(f"step schedule: negative token count {t!r}")
            size = _step_size(s)
            if parsed and tokens <= parsed[-1][0]:
                raise ScheduleError(
                    f"step schedule: tokens must increase strictly, got {format_tokens(tokens)} after {format_tokens(parsed[-1][0])}")
            parsed.append((tokens, size))
        if parsed[0][0] != 0:
            raise ScheduleError(f"step schedule must start at 0 tokens, starts at {format_tokens(parsed[0][0])}")
        self.points = parsed
        self._keys = [t for t, _ in parsed]

    @classmethod
    def parse(cls, text: str) -> "Steps":
        """'0:32 2M:64 8M:128' (space or comma separated TOKENS:SIZE items)."""
        if not isinstance(text, str):
            raise ScheduleError(f"step schedule: expected a string like '0:32 2M:64', got {text!r}")
        items = [x for x in re.split(r"[\s,]+", text.strip()) if x]
        pairs = []
        for item in items:
            parts = item.split(":")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ScheduleError(f"step schedule: bad item {item!r} (expected TOKENS:SIZE, e.g. 2M:64)")
            pairs.append((parts[0], parts[1]))
        return cls(pairs)

    def batch_at(self, tokens: int) -> int:
        _check_tokens(tokens)
        return self.points[bisect.bisect_right(self._keys, tokens) - 1][1]

    def sizes(self) -> list[int]:
        return sorted({s for _, s in self.points})

    def change_points(self) -> list[int]:
        return self._keys[1:]

    def __str__(self) -> str:
        return " ".join(f"{format_tokens(t)}:{s}" for t, s in self.points)

    def __repr__(self) -> str:
        return f"Steps({str(self)!r})"


def _step_size(s: Any) -> int:
    if isinstance(s, str):
        if not re.fullmatch(r"\s*-?[0-9_]+\s*", s):
            raise ScheduleError(f"step schedule: batch size {s!r} is not an integer")
        s = int(s.replace("_", ""))
    if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
        raise ScheduleError(f"step schedule: batch size must be a positive integer, got {s!r}")
    return s


class GrowInsteadOfDecay(BatchSchedule):
    """Smith et al. 2018, "Don't decay the learning rate, increase the batch size".

    The base recipe multiplies the LR by f_i < 1 at tokens t_i, with batch `base_batch`. Here each
    decay instead multiplies the batch by 1/f_i (rounded to an integer from the ideal
    base_batch / prod f), until `max_batch`; what the batch cannot absorb stays an LR decay:

        batch(t) = min(max_batch, round(base_batch / P(t))),  P(t) = prod of f_i with t_i <= t
        lr_multiplier(t) = P(t) * batch(t) / base_batch

    so lr_multiplier(t) / batch(t) = P(t) / base_batch exactly: the LR/batch ratio (the SGD noise
    scale g ~ lr N / B) follows the base schedule everywhere, with fewer optimizer steps. Rounding
    and the cap are absorbed by the LR multiplier. The equivalence is the linear-scaling one, so
    do not also apply scale_lr to this schedule's batch (lr_factor_at enforces rule="none").
    """

    def __init__(self, base_lr_steps: Union[str, Iterable[Any]], base_batch: int, max_batch: int,
                 factor: float = 0.1):
        self.base_batch = _positive_int(base_batch, "base_batch")
        self.max_batch = _positive_int(max_batch, "max_batch")
        if self.max_batch < self.base_batch:
            raise ScheduleError(f"max_batch ({self.max_batch}) must be >= base_batch ({self.base_batch})")
        items: list[Any]
        if isinstance(base_lr_steps, str):
            items = [x for x in re.split(r"[\s,]+", base_lr_steps.strip()) if x]
            items = [tuple(x.split(":", 1)) if ":" in x else x for x in items]
        else:
            items = list(base_lr_steps)
        points: list[int] = []
        factors: list[float] = []
        for item in items:
            if isinstance(item, (tuple, list)):
                if len(item) != 2:
                    raise ScheduleError(f"LR decay point: expected TOKENS or (TOKENS, FACTOR), got {item!r}")
                t, f = item
                try:
                    f = float(f)
                except (TypeError, ValueError):
                    raise ScheduleError(f"LR decay factor {f!r} is not a number") from None
            else:
                t, f = item, factor
            tokens = parse_tokens(t, "LR decay tokens")
            if tokens <= 0:
                raise ScheduleError(f"LR decay points must be at positive token counts, got {t!r}")
            if not (isinstance(f, (int, float)) and 0.0 < f < 1.0):
                raise ScheduleError(f"LR decay factor must be in (0, 1), got {f!r}")
            if points and tokens <= points[-1]:
                raise ScheduleError(f"LR decay points must increase strictly, got {format_tokens(tokens)} after {format_tokens(points[-1])}")
            points.append(tokens)
            factors.append(float(f))
        self.decay_tokens = points
        self.factors = factors

    def base_lr_multiplier_at(self, tokens: int) -> float:
        """The base recipe's LR multiplier P(t) (step decay at the given points)."""
        _check_tokens(tokens)
        return step_decay_multiplier(tokens, self.decay_tokens, self.factors)

    def _batch_for(self, p: float) -> int:
        return min(self.max_batch, int(math.floor(self.base_batch / p + 0.5)))

    def batch_at(self, tokens: int) -> int:
        return self._batch_for(self.base_lr_multiplier_at(tokens))

    def lr_multiplier_at(self, tokens: int) -> float:
        p = self.base_lr_multiplier_at(tokens)
        return p * self._batch_for(p) / self.base_batch

    def sizes(self) -> list[int]:
        out = {self.base_batch}
        p = 1.0
        for f in self.factors:
            p *= f
            out.add(self._batch_for(p))
        return sorted(out)

    def change_points(self) -> list[int]:
        return list(self.decay_tokens)

    def __repr__(self) -> str:
        pts = " ".join(f"{format_tokens(t)}:{f:g}" for t, f in zip(self.decay_tokens, self.factors))
        return f"GrowInsteadOfDecay({pts!r}, base_batch={self.base_batch}, max_batch={self.max_batch})"


# ----------------------------------------------------------------------------------------------
# Factory from a recipe value
# ----------------------------------------------------------------------------------------------
_TYPES: dict[str, tuple[type, tuple[str, ...], tuple[str, ...]]] = {
    # type: (class, required keys, optional keys)
    "constant": (Constant, ("size",), ()),
    "ramp": (Ramp, ("start", "increment", "ramp_tokens", "end"), ()),
    "steps": (Steps, ("steps",), ()),
    "grow_instead_of_decay": (GrowInsteadOfDecay, ("base_lr_steps", "base_batch", "max_batch"), ("factor",)),
}


def make_batch_schedule(spec: Union[BatchSchedule, Mapping[str, Any], str, int, Sequence[Any]]) -> BatchSchedule:
    """A schedule from a recipe value: `32` (constant), `"0:32 2M:64"` (steps), a list of
    [tokens, size] pairs (steps), or a dict with `type` in constant | ramp | steps |
    grow_instead_of_decay and that class's arguments, e.g.
    {"type": "ramp", "start": 8, "increment": 8, "ramp_tokens": "1M", "end": 64}."""
    if isinstance(spec, BatchSchedule):
        return spec
    if isinstance(spec, bool):
        raise ScheduleError(f"batch schedule: expected a size, a step string or a dict, got {spec!r}")
    if isinstance(spec, int):
        return Constant(spec)
    if isinstance(spec, str):
        if re.fullmatch(r"\s*[0-9_]+\s*", spec):
            return Constant(int(spec.replace("_", "")))
        return Steps.parse(spec)
    if isinstance(spec, Mapping):
        d = dict(spec)
        kind = d.pop("type", None)
        if kind is None:
            raise ScheduleError(f"batch schedule: missing 'type' (one of {', '.join(_TYPES)})")
        key = str(kind).lower().replace("-", "_")
        if key not in _TYPES:
            raise ScheduleError(f"batch schedule: unknown type {kind!r} (one of {', '.join(_TYPES)})")
        cls, required, optional = _TYPES[key]
        unknown = sorted(set(d) - set(required) - set(optional))
        if unknown:
            raise ScheduleError(
                f"batch schedule {key}: unknown key(s) {', '.join(unknown)} (expected {', '.join(required + optional)})")
        missing = [k for k in required if k not in d]
        if missing:
            raise ScheduleError(f"batch schedule {key}: missing key(s) {', '.join(missing)}")
        if cls is Steps:
            steps = d["steps"]
            return Steps.parse(steps) if isinstance(steps, str) else Steps(steps)
        return cls(**d)
    if isinstance(spec, (list, tuple)):
        return Steps(spec)
    raise ScheduleError(f"batch schedule: expected a size, a step string or a dict, got {spec!r}")


# ----------------------------------------------------------------------------------------------
# LR when the batch changes
# ----------------------------------------------------------------------------------------------
LR_RULES = ("linear", "sqrt", "none")


def scale_lr(base_lr: float, base_batch: int, batch: int, rule: str = "linear") -> float:
    """LR for `batch` given `base_lr` tuned at `base_batch`: linear (Goyal et al. 2017, SGD),
    sqrt (often preferred for Adam), or none."""
    if base_batch <= 0 or batch <= 0:
        raise ScheduleError(f"scale_lr: batch sizes must be positive, got base_batch={base_batch}, batch={batch}")
    if rule == "linear":
        return base_lr * batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(batch / base_batch)
    if rule == "none":
        return base_lr
    raise ScheduleError(f"LR scaling rule {rule!r} is not one of {', '.join(LR_RULES)}")


def lr_factor_at(schedule: BatchSchedule, tokens: int, base_batch: int, rule: str = "linear") -> float:
    """Everything a batch schedule does to the LR at `tokens`: the scaling rule applied to
    batch_at(tokens) vs `base_batch`, times the schedule's own lr_multiplier_at(tokens)."""
    if isinstance(schedule, GrowInsteadOfDecay) and rule != "none":
        raise ScheduleError(f"GrowInsteadOfDecay already trades LR for batch; use LR scaling rule 'none', not {rule!r}")
    return schedule.lr_multiplier_at(tokens) * scale_lr(1.0, base_batch, schedule.batch_at(tokens), rule)


# ----------------------------------------------------------------------------------------------
# Steps, gas and the accumulation-boundary trap
# ----------------------------------------------------------------------------------------------
def count_steps(schedule: BatchSchedule, total_tokens: int, seq_len: int) -> int:
    """Optimizer steps to consume `total_tokens` when each step takes batch_at(tokens) * seq_len
    tokens (the batch is read at the start of each step; the last step may overshoot)."""
    seq_len = _positive_int(seq_len, "seq_len")
    _check_tokens(total_tokens)
    points = [p for p in schedule.change_points() if p > 0]
    t = steps = 0
    while t < total_tokens:
        per_step = schedule.batch_at(t) * seq_len
        i = bisect.bisect_right(points, t)
        end = min(points[i], total_tokens) if i < len(points) else total_tokens
        n = -(-(end - t) // per_step)
        steps += n
        t += n * per_step
    return steps


# ----------------------------------------------------------------------------------------------
# Adaptive batch from the gradient noise scale
# ----------------------------------------------------------------------------------------------
class AdaptiveBatch:
    """Propose a batch near the measured critical batch (McCandlish et al. 2018: B_crit ~ B_simple).

    `propose(b_simple, current)`: target = scale * b_simple, rounded to the nearest multiple of
    `granularity` (use micro_batch * dp so every proposal is a valid size), clamped to
    [min_batch, max_batch], and never below `current` when `monotone` (the critical batch rises
    over training, Merrill et al. 2025, and shrinking the batch on a noisy estimate hurts more than
    waiting). An undefined, non-finite or non-positive estimate keeps `current`.
    """

    def __init__(self, min_batch: int, max_batch: int, granularity: int, *, scale: float = 1.0,
                 monotone: bool = True):
        self.min_batch = _positive_int(min_batch, "adaptive min_batch")
        self.max_batch = _positive_int(max_batch, "adaptive max_batch")
        self.granularity = _positive_int(granularity, "adaptive granularity")
        if self.max_batch < self.min_batch:
            raise ScheduleError(f"adaptive max_batch ({self.max_batch}) must be >= min_batch ({self.min_batch})")
        for name in ("min_batch", "max_batch"):
            if getattr(self, name) % self.granularity:
                raise ScheduleError(f"adaptive {name} ({getattr(self, name)}) is not a multiple of granularity {self.granularity}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ScheduleError(f"adaptive scale must be a positive number, got {scale!r}")
        self.scale = float(scale)
        self.monotone = monotone

    def propose(self, noise_scale_estimate: Optional[float], current: int) -> int:
        current = _positive_int(current, "current batch")
        if current % self.granularity:
            raise ScheduleError(f"current batch {current} is not a multiple of granularity {self.granularity}")
        est = noise_scale_estimate
        if est is None or not math.isfinite(est) or est <= 0:
            return min(max(current, self.min_batch), self.max_batch)
        g = self.granularity
        target = g * int(math.floor(self.scale * est / g + 0.5))
        if self.monotone:
            target = max(target, current)
        return min(max(target, self.min_batch), self.max_batch)

    def sizes(self) -> list[int]:
        return list(range(self.min_batch, self.max_batch + 1, self.granularity))

    def validate(self, micro_batch: int, dp: int) -> None:
        unit = _positive_int(micro_batch, "micro_batch") * _positive_int(dp, "dp")
        if self.granularity % unit:
            raise ScheduleError(
                f"adaptive granularity {self.granularity} is not divisible by micro_batch {micro_batch} x dp {dp} = {unit}")

    def __repr__(self) -> str:
        return f"AdaptiveBatch({self.min_batch}, {self.max_batch}, {self.granularity})"
