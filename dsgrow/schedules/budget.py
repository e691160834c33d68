"""Token and FLOP budgets, and the Chinchilla loss fit L(N, D) = E + A / N^alpha + B / D^beta.

Two published constant sets:
  - "hoffmann": Hoffmann et al. 2022 as published (E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28).
    Gives D/N ~ 63 at C = 1e22, far from the paper's own ~20 tokens/parameter.
  - "epoch": Besiroglu et al. 2024 (Epoch AI) refit of the same data (E 1.8172, A 482.01,
    B 2085.43, alpha 0.3478, beta 0.3658); D/N ~ 20 at C = 1e22. The default here.

Compute-optimal split of C ~ 6 N D (minimise L subject to 6 N D = C):
  N_opt = G (C/6)^a,  D_opt = G^-1 (C/6)^b,
  G = (alpha A / (beta B))^(1 / (alpha + beta)),  a = beta / (alpha + beta),  b = alpha / (alpha + beta).
(a + b = 1, so N_opt D_opt = C / 6 exactly.) N is the parameter count as the fit counts it
(Chinchilla counted all parameters, embeddings included) and C = 6 N D leaves out the attention
term (see flops.py for the finer count).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Optional, Sequence, Union

from .batch import ScheduleError, format_tokens, parse_tokens


@dataclass(frozen=True)
class ChinchillaFit:
    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, N: float, D: float) -> float:
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)


FITS: dict[str, ChinchillaFit] = {
    "hoffmann": ChinchillaFit("hoffmann", 1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, published constants"),
    "epoch": ChinchillaFit("epoch", 1.8172, 482.01, 2085.43, 0.3478, 0.3658, "Besiroglu et al. 2024 (Epoch AI) refit"),
}
DEFAULT_FIT = "epoch"

FitLike = Union[str, ChinchillaFit]


def get_fit(fit: FitLike = DEFAULT_FIT) -> ChinchillaFit:
    if isinstance(fit, ChinchillaFit):
        return fit
    if fit not in FITS:
        raise ScheduleError(f"unknown loss fit {fit!r} (choose from {', '.join(FITS)})")
    return FITS[fit]


def parse_quantity(value: Any, what: str) -> float:
    """A positive finite number from a float, an int or a string such as '1e21', '70B', '1.4T'
    (decimal K/M/B/T suffixes). ScheduleError naming `what` otherwise."""
    if isinstance(value, bool):
        raise ScheduleError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        text = value.strip().replace("_", "")
        suffix = text[-1].upper() if text[-1:].isalpha() else ""
        try:
            d = Decimal(text[: len(text) - len(suffix)])
        except InvalidOperation:
            raise ScheduleError(f"{what}: cannot parse {value!r} as a number") from None
        mult = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}.get(suffix)
        if mult is None:
            raise ScheduleError(f"{what}: bad suffix in {value!r} (use K, M, B or T)")
        x = float(d * mult) if d.is_finite() else math.nan
    else:
        raise ScheduleError(f"{what}: expected a number, got {value!r}")
    if not math.isfinite(x) or x <= 0:
        raise ScheduleError(f"{what} must be a positive number, got {value!r}")
    return x


def _pos(x: float, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ScheduleError(f"{what} must be a positive number, got {x!r}")
    return float(x)


def loss(N: float, D: float, fit: FitLike = DEFAULT_FIT) -> float:
    """Predicted final loss of N parameters trained on D tokens."""
    return get_fit(fit).loss(_pos(N, "params"), _pos(D, "tokens"))


def compute_optimal(flops: float, fit: FitLike = DEFAULT_FIT) -> tuple[float, float]:
    """(N_opt, D_opt) for a budget of `flops` (closed form above)."""
    f = get_fit(fit)
    c6 = _pos(flops, "flops") / 6.0
    return f.G * c6 ** f.a, c6 ** f.b / f.G


def optimal_loss(flops: float, fit: FitLike = DEFAULT_FIT) -> float:
    """Loss at the compute-optimal point for `flops`."""
    n, d = compute_optimal(flops, fit)
    return get_fit(fit).loss(n, d)


def flops_for_loss(target_loss: float, fit: FitLike = DEFAULT_FIT) -> float:
    """Smallest budget whose compute-optimal model reaches `target_loss` (bisection on log C)."""
    f = get_fit(fit)
    if not target_loss > f.E:
        raise ScheduleError(f"target loss {target_loss} is not above the fit's irreducible loss E = {f.E}")
    lo, hi = 0.0, 80.0 * math.log(10)  # log C in [0, log 1e80]
    if optimal_loss(math.exp(hi), f) > target_loss:
        raise ScheduleError(f"target loss {target_loss} needs more than 1e80 FLOPs under the {f.name} fit")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if optimal_loss(math.exp(mid), f) > target_loss:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def from_tokens(tokens: float, flops: Optional[float] = None, fit: FitLike = DEFAULT_FIT) -> tuple[float, float]:
    """(N, D) for D = `tokens`: N = flops / (6 D) when a budget is given, else the N for which
    D is compute-optimal (C/6 = (D G)^(1/b), N = (C/6) / D)."""
    d = _pos(tokens, "tokens")
    if flops is not None:
        return _pos(flops, "flops") / (6.0 * d), d
    f = get_fit(fit)
    c6 = (d * f.G) ** (1.0 / f.b)
    return c6 / d, d


def from_params(params: float, flops: Optional[float] = None, fit: FitLike = DEFAULT_FIT) -> tuple[float, float]:
    """(N, D) for N = `params`: D = flops / (6 N) when a budget is given, else the D for which
    N is compute-optimal (C/6 = (N / G)^(1/a), D = (C/6) / N)."""
    n = _pos(params, "params")
    if flops is not None:
        return n, _pos(flops, "flops") / (6.0 * n)
    f = get_fit(fit)
    c6 = (n / f.G) ** (1.0 / f.a)
    return n, c6 / n


def gpu_hours_to_flops(hours: float, mfu: float, peak_tflops: float) -> float:
    """hours x 3600 s x mfu x peak TFLOP/s x 1e12 (peak: the dense bf16 number, e.g. 989 for an
    H100 SXM)."""
    _pos(hours, "gpu hours")
    if isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise ScheduleError(f"mfu must be in (0, 1], got {mfu!r}")
    return hours * 3600.0 * mfu * _pos(peak_tflops, "peak_tflops") * 1e12


# ----------------------------------------------------------------------------------------------
# A run's budget and the stages that share it
# ----------------------------------------------------------------------------------------------
StageAmount = Union[None, float, int, str]


class Budget:
    """A run's total budget: exactly one of `tokens` or `flops`, positive.

    Stage amounts (`stage_tokens`) are each one of
      - a float in (0, 1] or a string like "25%": that fraction of the budget,
      - an int or a token string like "2M" / "250B": that many tokens,
      - None or "rest": whatever the other stages leave (at most one stage).
    With a FLOP budget, fractions are of the FLOPs and each stage's tokens follow from its own
    FLOPs per token (6 N, or flops.flops_per_token(spec)), which must then be given.
    """

    def __init__(self, tokens: Union[int, str, None] = None, flops: Union[float, str, None] = None):
        if (tokens is None) == (flops is None):
            raise ScheduleError("budget: give exactly one of tokens or flops")
        self.tokens: Optional[int] = None
        self.flops: Optional[float] = None
        if tokens is not None:
            self.tokens = parse_tokens(tokens, "budget.tokens")
            if self.tokens <= 0:
                raise ScheduleError(f"budget.tokens must be positive, got {tokens!r}")
        else:
            self.flops = parse_quantity(flops, "budget.flops")

    @property
    def kind(self) -> str:
        return "tokens" if self.tokens is not None else "flops"

    @property
    def total(self) -> float:
        return float(self.tokens) if self.tokens is not None else float(self.flops)

    def __repr__(self) -> str:
        return f"Budget(tokens={format_tokens(self.tokens)})" if self.tokens is not None else f"Budget(flops={self.flops:.3g})"

    def _costs(self, n: int, flops_per_token: Union[None, float, Sequence[float]]) -> list[float]:
        if self.tokens is not None:
            return [1.0] * n
        if flops_per_token is None:
            raise ScheduleError("budget: a FLOP budget needs flops_per_token to turn FLOPs into tokens")
        if isinstance(flops_per_token, (int, float)):
            costs = [float(flops_per_token)] * n
        else:
            costs = [float(x) for x in flops_per_token]
            if len(costs) != n:
                raise ScheduleError(f"budget: {n} stage(s) but {len(costs)} flops_per_token value(s)")
        for c in costs:
            _pos(c, "flops_per_token")
        return costs

    def fraction_to_tokens(self, fraction: float, flops_per_token: Optional[float] = None) -> int:
        """Tokens that `fraction` of the budget buys (at `flops_per_token` for a FLOP budget)."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ScheduleError(f"budget fraction must be in (0, 1], got {fraction!r}")
        cost = self._costs(1, flops_per_token)[0]
        return int(round(fraction * self.total / cost))

    def stage_tokens(self, stages: Sequence[StageAmount],
                     flops_per_token: Union[None, float, Sequence[float]] = None) -> list[int]:
        """Token count of every stage; the stages must use the whole budget (one-line error when
        they overrun it, fall short with no 'rest' stage, or leave nothing for the rest)."""
        if not stages:
            raise ScheduleError("budget: no stages")
        costs = self._costs(len(stages), flops_per_token)
        units: list[Optional[float]] = []  # budget units (tokens or FLOPs) per stage, None = rest
        for i, s in enumerate(stages):
            units.append(self._stage_units(i, s, costs[i]))
        rest = [i for i, u in enumerate(units) if u is None]
        if len(rest) > 1:
            raise ScheduleError(f"budget: stages {', '.join(str(i) for i in rest)} are all 'rest'; at most one may be")
        used = sum(u for u in units if u is not None)
        total = self.total
        tol = 1e-9 * total + (max(costs) if self.tokens is None else 0.5)
        what = "tokens" if self.tokens is not None else "FLOPs"
        if used > total + tol:
            raise ScheduleError(f"budget: stages need {used:.4g} {what}, more than the budget's {total:.4g}")
        if rest:
            left = total - used
            if left <= tol:
                raise ScheduleError(f"budget: the other stages use the whole {total:.4g} {what}; nothing is left for the 'rest' stage")
            units[rest[0]] = left
        elif used < total - tol:
            raise ScheduleError(
                f"budget: stages add up to {used:.4g} of the budget's {total:.4g} {what}; make them add up or mark one stage 'rest'")
        out = [int(round(u / c)) for u, c in zip(units, costs)]
        if self.tokens is not None:  # absorb rounding so the token stages sum exactly to the budget
            j = rest[0] if rest else len(out) - 1
            out[j] += self.tokens - sum(out)
        if any(t <= 0 for t in out):
            raise ScheduleError(f"budget: a stage rounds to no tokens ({out})")
        return out

    def _stage_units(self, i: int, s: StageAmount, cost: float) -> Optional[float]:
        where = f"budget: stage {i}"
        if s is None or (isinstance(s, str) and s.strip().lower() == "rest"):
            return None
        if isinstance(s, bool):
            raise ScheduleError(f"{where}: expected a fraction, a token count or 'rest', got {s!r}")
        if isinstance(s, str) and s.strip().endswith("%"):
            try:
                frac = float(s.strip()[:-1]) / 100.0
            except ValueError:
                raise ScheduleError(f"{where}: cannot parse {s!r} as a percentage") from None
            if not 0 < frac <= 1:
                raise ScheduleError(f"{where}: fraction must be in (0, 100%], got {s!r}")
            s = frac
        if isinstance(s, float) and s <= 1:
            if not s > 0:
                raise ScheduleError(f"{where}: fraction must be in (0, 1], got {s!r}")
            return s * self.total
        tokens = parse_tokens(s, f"budget: stage {i} tokens")
        if tokens <= 0:
            raise ScheduleError(f"{where}: token count must be positive, got {s!r}")
        return tokens * cost
