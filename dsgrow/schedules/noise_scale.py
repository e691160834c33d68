"""Gradient noise scale from data-parallel gradient norms (McCandlish et al. 2018, appendix A.1).

A gradient averaged over B examples has E|G_B|^2 = |G|^2 + tr(Sigma) / B, with G the true gradient
and Sigma the per-example gradient covariance. Two batch sizes give two equations; in data-parallel
training both come for free:
  - B_small: one rank's batch (micro_batch x gas), |G_small|^2 its local gradient's squared norm
    before the all-reduce (averaging it over ranks lowers the variance, same expectation);
  - B_big: the global batch, |G_big|^2 the squared norm after the all-reduce.
Then
  |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
  tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)
Each single-step estimate is very noisy (|G|^2 can come out negative), so each is smoothed with an
EMA and B_simple = tr(Sigma) / |G|^2 is the ratio of the smoothed values (not the mean of ratios).

Pure float arithmetic; the caller computes the norms (with whatever loss scaling undone) and
decides when to update. Non-finite inputs (fp16 overflow steps) are skipped and counted.
"""
from __future__ import annotations

import math
from typing import Any, Optional


class NoiseScaleEstimator:
    """EMA-smoothed |G|^2 and tr(Sigma) estimates and their ratio B_simple.

    The EMAs start at 0 and are bias-corrected (as in Adam), so after n updates each is the
    normalised weighted mean of the n single-step estimates with weights beta^(n-i).
    """

    def __init__(self, beta: float = 0.99):
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"noise scale: beta must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self._g_sq = 0.0
        self._trace = 0.0
        self.count = 0
        self.skipped = 0

    @staticmethod
    def estimates(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
        """Single-step unbiased estimates (|G|^2, tr(Sigma)) from the two squared norms."""
        if not (b_small > 0 and b_big > b_small):
            raise ValueError(f"noise scale: need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
        g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
        trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
        return g_sq, trace

    def update(self, g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> Optional[float]:
        """Fold in one step's squared norms; returns the current b_simple (None while undefined)."""
        if not (math.isfinite(g_small_sq) and math.isfinite(g_big_sq)):
            self.skipped += 1
            return self.b_simple
        if g_small_sq < 0 or g_big_sq < 0:
            raise ValueError(f"noise scale: squared norms must be >= 0, got {g_small_sq}, {g_big_sq}")
        g_sq, trace = self.estimates(g_small_sq, g_big_sq, b_small, b_big)
        b = self.beta
        self._g_sq = b * self._g_sq + (1.0 - b) * g_sq
        self._trace = b * self._trace + (1.0 - b) * trace
        self.count += 1
        return self.b_simple

    def _correction(self) -> float:
        return 1.0 - self.beta ** self.count

    @property
    def g_sq(self) -> Optional[float]:
        """Smoothed |G|^2 estimate (None before the first update)."""
        return self._g_sq / self._correction() if self.count else None

    @property
    def trace_sigma(self) -> Optional[float]:
        """Smoothed tr(Sigma) estimate (None before the first update)."""
        return self._trace / self._correction() if self.count else None

    @property
    def b_simple(self) -> Optional[float]:
        """tr(Sigma) / |G|^2 from the smoothed estimates; None before the first update or while
        either smoothed estimate is <= 0 (noise has swamped the signal: not a usable batch size)."""
        if not self.count:
            return None
        g_sq, trace = self.g_sq, self.trace_sigma
        if g_sq <= 0 or trace <= 0:
            return None
        return trace / g_sq

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "g_sq_ema": self._g_sq, "trace_ema": self._trace,
                "count": self.count, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        beta = float(state["beta"])
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"noise scale: beta must be in [0, 1), got {beta!r}")
        self.beta = beta
        self._g_sq = float(state["g_sq_ema"])
        self._trace = float(state["trace_ema"])
        self.count = int(state["count"])
        self.skipped = int(state.get("skipped", 0))

    def __repr__(self) -> str:
        return f"NoiseScaleEstimator(beta={self.beta}, count={self.count}, b_simple={self.b_simple})"
