"""A two-stage growth plan under a FLOP budget, from the Chinchilla loss fit.

There is no closed form for a growing model, so this is a small search with an explicit model of
what growth buys:

  1. Stage 1 trains a small model (N1 params) on D1 tokens: cost 6 N1 D1, loss L1 = L(N1, D1).
  2. Growth is function-preserving: the grown model (N2 params) starts at loss L1.
  3. From there it behaves like an N2 model trained from scratch that has reached L1, i.e. one that
     has seen D_eq tokens, L(N2, D_eq) = L1:
         D_eq = (B / (L1 - E - A / N2^alpha))^(1/beta)          (exists because N1 < N2)
     multiplied by `transfer` (1 = the ideal; real runs lose some to the loss spike after growth
     and the fresh optimizer state).
  4. Stage 2 spends the rest of the budget: D2 = (C - 6 N1 D1) / (6 N2), final loss
     L(N2, transfer * D_eq + D2).

Growth pays when D_eq exceeds the tokens the same FLOPs would have bought the large model,
D1 N1 / N2. Early on the small model learns more per FLOP; once it nears its own floor
(E + A / N1^alpha) D_eq stops growing, so the best growth point falls near the small model's own
compute-optimal token count, which matches the growth literature's rule of thumb (grow about 2x
once the small model is past its compute-optimal point). The search covers small/final parameter
ratios 1/8 (half width and half depth; params ~ layers x width^2), 1/4 (half width) and 1/2 (half
depth), final sizes 0.25 to 4 x the compute-optimal N, and every growth point within the budget.

Under both published fits the predicted gain is small (a few thousandths in loss, 3 to 5% of
compute at equal loss, the same fraction at every budget because E cancels and both reducible
terms scale as C^(-alpha beta / (alpha + beta)) along the optimum): the fit's scratch curve is already efficient, and the larger savings growth
papers report are outside what this model can predict. The planner says so rather than inventing
a bigger number.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

from .batch import ScheduleError
from .budget import DEFAULT_FIT, FitLike, compute_optimal, flops_for_loss, from_params, get_fit

SHAPES: dict[float, str] = {1 / 8: "half width, half depth", 1 / 4: "half width", 1 / 2: "half depth"}
FINAL_SCALE_RANGE = (0.25, 4.0)


@dataclass(frozen=True)
class StagePlan:
    params: float
    tokens: float
    flops: float
    loss_end: float
    """Predicted loss at the end of the stage."""
    shape: str

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


@dataclass(frozen=True)
class GrowthPlan:
    flops: float
    fit: str
    scratch_params: float
    scratch_tokens: float
    scratch_loss: float
    small: StagePlan
    large: StagePlan
    small_optimal_tokens: float
    """Compute-optimal token count of the small model alone (from_params under the fit)."""
    effective_tokens: float
    """Tokens of from-scratch training the large model is credited with at the growth point."""
    predicted_loss: float
    scratch_flops_same_loss: float
    """FLOPs a compute-optimal scratch run needs to reach predicted_loss."""
    transfer: float
    assumptions: tuple[str, ...]

    @property
    def grow_at_tokens(self) -> float:
        return self.small.tokens

    @property
    def grow_at_ratio(self) -> float:
        """Growth point over the small model's own compute-optimal tokens."""
        return self.small.tokens / self.small_optimal_tokens

    @property
    def total_tokens(self) -> float:
        return self.small.tokens + self.large.tokens

    @property
    def flops_saving(self) -> float:
        """1 - budget / (scratch FLOPs for the same loss); <= 0 when growth does not help."""
        return 1.0 - self.flops / self.scratch_flops_same_loss

    @property
    def helps(self) -> bool:
        return self.predicted_loss < self.scratch_loss

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["assumptions"] = list(self.assumptions)
        d.update(grow_at_tokens=self.grow_at_tokens, grow_at_ratio=self.grow_at_ratio,
                 total_tokens=self.total_tokens, flops_saving=self.flops_saving, helps=self.helps)
        return d

    def lines(self) -> list[str]:
        s, l = self.small, self.large
        if not self.helps:
            return ["  growth is not predicted to help under these assumptions: train the compute-optimal model from scratch"]
        out = [
            f"  stage 1: {human(s.params)} params ({s.shape} of the final model) for {human(s.tokens)} tokens "
            f"({s.tokens_per_param:.1f} tokens/param, {100 * s.flops / self.flops:.1f}% of the FLOPs), loss {s.loss_end:.4f}",
            f"  grow at {human(self.grow_at_tokens)} tokens = {self.grow_at_ratio:.2f} x the small model's "
            f"compute-optimal {human(self.small_optimal_tokens)}; the grown model counts as having seen "
            f"{human(self.effective_tokens)} tokens",
            f"  stage 2: {human(l.params)} params ({l.params / self.scratch_params:.2f} x compute-optimal) for "
            f"{human(l.tokens)} tokens ({l.tokens_per_param:.1f} tokens/param, {100 * l.flops / self.flops:.1f}% of the FLOPs)",
            f"  predicted final loss {self.predicted_loss:.4f} vs {self.scratch_loss:.4f} from scratch "
            f"({self.scratch_loss - self.predicted_loss:.4f} lower)",
            f"  a scratch run needs {self.scratch_flops_same_loss:.3g} FLOPs for that loss "
            f"(growth saves {100 * self.flops_saving:.1f}% of the compute)",
        ]
        return out


def human(x: float) -> str:
    """3 significant digits with a K/M/B/T suffix: 2.78B, 60.0B, 1.40T."""
    for suffix, unit in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= unit:
            v = x / unit
            if v >= 1000:
                return f"{x:.3g}"
            return f"{v:.3g}{suffix}" if v < 100 else f"{v:.0f}{suffix}"
    return f"{x:.3g}"


_GOLD = (math.sqrt(5.0) - 1.0) / 2.0


def _argmin(f: Callable[[float], float], lo: float, hi: float, grid: int = 40, iters: int = 60) -> tuple[float, float]:
    """Minimum of f on [lo, hi]: a grid finds the basin, golden-section search refines it."""
    xs = [lo + (hi - lo) * i / grid for i in range(grid + 1)]
    ys = [f(x) for x in xs]
    i = min(range(len(xs)), key=ys.__getitem__)
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, grid)]
    c, d = b - _GOLD * (b - a), a + _GOLD * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLD * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLD * (b - a)
            fd = f(d)
    best = min(((xs[i], ys[i]), (c, fc), (d, fd)), key=lambda t: t[1])
    return best


def plan_growth(flops: float, fit: FitLike = DEFAULT_FIT, *, ratios: Sequence[float] = tuple(SHAPES),
                final_scale: Optional[float] = None, grow_at: Optional[float] = None,
                transfer: float = 1.0) -> GrowthPlan:
    """Best two-stage plan for `flops` under the model in this module's docstring.

    ratios: small/final parameter ratios to try (each < 1).
    final_scale: fix the final model at this multiple of the compute-optimal N (default: search
        0.25 to 4).
    grow_at: fix the growth point at this multiple of the small model's compute-optimal tokens
        (default: search the whole budget).
    transfer: fraction of the loss-matched tokens credited to the grown model (0 to 1).
    """
    f = get_fit(fit)
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not math.isfinite(flops) or flops <= 0:
        raise ScheduleError(f"plan: flops must be a positive number, got {flops!r}")
    if not (isinstance(transfer, (int, float)) and 0.0 <= transfer <= 1.0):
        raise ScheduleError(f"plan: transfer must be in [0, 1], got {transfer!r}")
    ratios = tuple(ratios)
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ScheduleError(f"plan: small/final ratios must be in (0, 1), got {ratios!r}")
    if final_scale is not None and not final_scale > 0:
        raise ScheduleError(f"plan: final_scale must be positive, got {final_scale!r}")
    if grow_at is not None and not grow_at > 0:
        raise ScheduleError(f"plan: grow_at must be positive, got {grow_at!r}")

    C = float(flops)
    n_opt, d_opt = compute_optimal(C, f)
    scratch_loss = f.loss(n_opt, d_opt)

    def final_loss(n1: float, d1: float, n2: float) -> tuple[float, float, float]:
        """(final loss, D_eq, D2) of small N1 for D1 tokens, grown to N2."""
        d2 = (C - 6.0 * n1 * d1) / (6.0 * n2)
        gap = f.loss(n1, d1) - f.E - f.A / n2 ** f.alpha
        d_eq = transfer * (f.B / gap) ** (1.0 / f.beta)
        return f.loss(n2, d_eq + d2), d_eq, d2

    def best_d1(n1: float, n2: float) -> Optional[tuple[float, float]]:
        """(log D1, loss) minimising the final loss, or None if the fixed growth point is unaffordable."""
        d_max = C / (6.0 * n1)
        if grow_at is not None:
            d1 = grow_at * from_params(n1, fit=f)[1]
            if d1 >= d_max * (1 - 1e-9):
                return None
            return math.log(d1), final_loss(n1, d1, n2)[0]
        return _argmin(lambda x: final_loss(n1, math.exp(x), n2)[0],
                       math.log(d_max * 1e-6), math.log(d_max * (1 - 1e-6)))

    best: Optional[tuple[float, float, float, float]] = None  # (loss, ratio, scale, log d1)
    for r in ratios:
        def outer(log_s: float) -> float:
            res = best_d1(r * n_opt * math.exp(log_s), n_opt * math.exp(log_s))
            return res[1] if res else math.inf

        if final_scale is not None:
            log_s = math.log(final_scale)
        else:
            log_s = _argmin(outer, *(math.log(x) for x in FINAL_SCALE_RANGE), grid=24, iters=40)[0]
        res = best_d1(r * n_opt * math.exp(log_s), n_opt * math.exp(log_s))
        if res is not None and (best is None or res[1] < best[0]):
            best = (res[1], r, math.exp(log_s), res[0])
    if best is None:
        raise ScheduleError(f"plan: growing at {grow_at} x the small model's compute-optimal tokens does not fit in {C:.3g} FLOPs")

    loss_final, r, s, log_d1 = best
    n2 = s * n_opt
    n1 = r * n2
    d1 = math.exp(log_d1)
    loss_final, d_eq, d2 = final_loss(n1, d1, n2)
    small = StagePlan(n1, d1, 6.0 * n1 * d1, f.loss(n1, d1), SHAPES.get(r, f"{r:g} x the parameters"))
    large = StagePlan(n2, d2, 6.0 * n2 * d2, loss_final, "final model")
    small_opt = from_params(n1, fit=f)[1]
    assumptions = (
        f"loss fit: {f.source}, L(N, D) = {f.E} + {f.A} / N^{f.alpha} + {f.B} / D^{f.beta}; "
        "N counted as the fit counts it (Chinchilla: all parameters, embeddings included)",
        "cost: 6 N D FLOPs per stage; attention FLOPs and the growth operator's own cost are left out",
        "single pass over the data, LR schedule tuned for each stage; batch size effects are outside the fit",
        "growth is function-preserving: the grown model starts at the small model's loss",
        "after growing, the large model follows its own from-scratch curve from the point with that loss "
        f"(credited tokens x transfer = {transfer:g}; 1 is the ideal, the loss spike and fresh optimizer state cost some of it)",
        "parameters scale as layers x width^2: half width = 1/4, half depth = 1/2, both = 1/8 of the final model",
        f"searched: small/final ratio in {{{', '.join(f'{x:g}' for x in ratios)}}}, "
        + (f"final size fixed at {final_scale:g} x" if final_scale is not None else
           f"final size {FINAL_SCALE_RANGE[0]:g} to {FINAL_SCALE_RANGE[1]:g} x")
        + " the compute-optimal N, "
        + (f"growth fixed at {grow_at:g} x the small model's compute-optimal tokens" if grow_at is not None else
           "growth point anywhere in the budget")
        + "; two stages (one growth event)",
        "larger savings reported by growth papers are not predicted by this model; treat the plan as a starting point",
    )
    return GrowthPlan(
        flops=C, fit=f.name, scratch_params=n_opt, scratch_tokens=d_opt, scratch_loss=scratch_loss,
        small=small, large=large, small_optimal_tokens=small_opt, effective_tokens=d_eq,
        predicted_loss=loss_final,
        scratch_flops_same_loss=flops_for_loss(loss_final, f) if loss_final < scratch_loss else C,
        transfer=float(transfer), assumptions=assumptions,
    )
