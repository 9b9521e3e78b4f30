"""Batch latency predictor of the SLO-aware scheduler (SERVING.md, SCORPIO's step-time model).

A ranking batch costs a fixed overhead, the user side of every user whose ``encode_user``
output is not cached (LONGER over ``L`` events: linear in ``L``), and per candidate a
group-side pass that attends to the user's ``L`` cached keys::

    ms ≈ c0 + Σ_missing users (a0 + a1·L_u) + Σ_requests N_r·(b0 + b1·L_u)

Five coefficients, linear in them: ``fit`` solves least squares (non-negative, so a noisy
sweep never predicts that more work is faster) on a profiling sweep run at replica start.
``observe`` tracks drift afterwards with an EWMA of the ratio actual ÷ predicted, and every
``refit_every`` executed batches refits the coefficients on the sweep plus the recent batches,
keeping the refit only if it predicts those batches better. The sweep runs while the other
replicas start too (on 2 cores their fits had R² 0.7), and one scale factor cannot correct
an overhead that is too high and a per-candidate cost that is too low: a predictor that
overestimates makes the scheduler reject requests that would have made their deadline.
Errors are absorbed by the scheduler's margins (``SchedulerConfig.margin_ms``/``margin_factor``).
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FEATURES = ("overhead", "missing_users", "missing_user_events", "candidates", "candidate_events")


@dataclass(frozen=True)
class BatchShape:
    """What a batch costs depends on: per request (its candidates, its user's history length,
    whether that user's side is cached). Tuples, one entry per request in the batch."""

    candidates: tuple[int, ...]
    seq_lens: tuple[int, ...]
    cached: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not len(self.candidates) == len(self.seq_lens) == len(self.cached):
            raise ValueError(
                f"BatchShape: candidates ({len(self.candidates)}), seq_lens ({len(self.seq_lens)}) and "
                f"cached ({len(self.cached)}) must have one entry per request"
            )

    def features(self) -> np.ndarray:
        """(5,) float64 in the order of ``FEATURES``."""
        n = np.asarray(self.candidates, dtype=np.float64)
        length = np.asarray(self.seq_lens, dtype=np.float64)
        miss = ~np.asarray(self.cached, dtype=bool)
        return np.array([1.0, miss.sum(), length[miss].sum(), n.sum(), (n * length).sum()])


@dataclass(frozen=True)
class FitReport:
    """How well the fitted model explains the profiling sweep (reported at replica start)."""

    r2: float
    mape: float  # mean |pred - actual| / actual
    max_abs_error_ms: float
    samples: int

    def as_dict(self) -> dict[str, float]:
        return {"r2": self.r2, "mape": self.mape, "max_abs_error_ms": self.max_abs_error_ms, "samples": self.samples}


class LatencyModel:
    """``predict_ms(shape)``: the batch time the scheduler plans with (before its margins)."""

    def __init__(
        self,
        coef: Sequence[float] = (1.0, 0.0, 0.0, 0.05, 0.0),
        ewma_alpha: float = 0.1,
        refit_every: int = 64,
        window: int = 512,
    ) -> None:
        if len(coef) != len(FEATURES):
            raise ValueError(f"LatencyModel: {len(FEATURES)} coefficients {FEATURES}, got {len(coef)}")
        if any(c < 0 or not math.isfinite(c) for c in coef):
            raise ValueError(f"LatencyModel: coefficients must be finite and >= 0, got {tuple(coef)}")
        if not 0.0 < ewma_alpha <= 1.0:
            raise ValueError(f"LatencyModel: ewma_alpha must be in (0, 1], got {ewma_alpha}")
        if refit_every < 0 or window < len(FEATURES):
            raise ValueError(f"LatencyModel: refit_every >= 0 (0 = never) and window >= {len(FEATURES)}")
        self.coef = np.asarray(coef, dtype=np.float64)
        self.ewma_alpha = ewma_alpha
        self.scale = 1.0  # EWMA of actual / predicted since the fit
        self.report: FitReport | None = None  # of the profiling sweep
        self.live: FitReport | None = None  # of the recent batches, at the last refit
        self.refit_every, self.refits = refit_every, 0
        self._sweep = (np.zeros((0, len(FEATURES))), np.zeros(0))
        self._recent: collections.deque[tuple[np.ndarray, float]] = collections.deque(maxlen=window)
        self._since_refit = 0

    @classmethod
    def fit(
        cls,
        shapes: Sequence[BatchShape],
        actual_ms: Sequence[float],
        ewma_alpha: float = 0.1,
        refit_every: int = 64,
        window: int = 512,
    ) -> LatencyModel:
        """Non-negative least squares on a profiling sweep; ``report`` holds R², MAPE, max error."""
        if len(shapes) != len(actual_ms) or len(shapes) < len(FEATURES):
            raise ValueError(
                f"LatencyModel.fit needs one time per shape and at least {len(FEATURES)} samples, "
                f"got {len(shapes)} shapes and {len(actual_ms)} times"
            )
        x = np.stack([s.features() for s in shapes])
        y = np.asarray(actual_ms, dtype=np.float64)
        if not np.all(np.isfinite(y)) or np.any(y <= 0):
            raise ValueError("LatencyModel.fit: every measured time must be finite and > 0 ms")
        model = cls(_nnls(x, y), ewma_alpha, refit_every, window)
        model.report = model.evaluate(shapes, actual_ms)
        model._sweep = (x, y)
        return model

    def evaluate(self, shapes: Sequence[BatchShape], actual_ms: Sequence[float]) -> FitReport:
        """R², MAPE and max absolute error of ``predict_ms`` against measured times."""
        pred = np.array([self.predict_ms(s) for s in shapes])
        return _report(pred, np.asarray(actual_ms, dtype=np.float64))

    def predict_ms(self, shape: BatchShape) -> float:
        return float(self.coef @ shape.features()) * self.scale

    def user_side_ms(self, seq_len: int) -> float:
        """What encoding one uncached user adds to a batch."""
        return float(self.coef[1] + self.coef[2] * seq_len) * self.scale

    def candidate_ms(self, seq_len: int) -> float:
        """What one candidate of a user with ``seq_len`` events adds to a batch."""
        return float(self.coef[3] + self.coef[4] * seq_len) * self.scale

    def overhead_ms(self) -> float:
        return float(self.coef[0]) * self.scale

    def observe(self, shape: BatchShape, actual_ms: float) -> None:
        """Fold one executed batch's time into the drift correction (EWMA of actual ÷ predicted)."""
        raw = float(self.coef @ shape.features())
        if raw <= 0 or not math.isfinite(actual_ms) or actual_ms <= 0:
            return
        ratio = min(max(actual_ms / raw, 0.1), 10.0)  # one stall (GC, page fault) must not swing plans 100x
        self.scale = (1 - self.ewma_alpha) * self.scale + self.ewma_alpha * ratio
        self._recent.append((shape.features(), float(actual_ms)))
        self._since_refit += 1
        if self.refit_every and self._since_refit >= self.refit_every:
            self._since_refit = 0
            self._refit()

    def _refit(self) -> None:
        """NNLS on the sweep plus the recent batches; adopted (scale reset to 1) only if it has a
        lower mean absolute percentage error on the recent batches than the model in use."""
        recent_x = np.stack([f for f, _ in self._recent])
        recent_y = np.array([t for _, t in self._recent])
        coef = _nnls(np.vstack([self._sweep[0], recent_x]), np.concatenate([self._sweep[1], recent_y]))
        if _report(recent_x @ coef, recent_y).mape < _report(recent_x @ self.coef * self.scale, recent_y).mape:
            self.coef, self.scale = coef, 1.0
            self.refits += 1
        self.live = _report(recent_x @ self.coef * self.scale, recent_y)


def _report(pred: np.ndarray, y: np.ndarray) -> FitReport:
    """R², MAPE and max absolute error of predictions ``pred`` against measured times ``y``."""
    residual = y - pred
    total = float(((y - y.mean()) ** 2).sum())
    return FitReport(
        r2=1.0 - float((residual**2).sum()) / total if total > 0 else 0.0,
        mape=float(np.mean(np.abs(residual) / y)),
        max_abs_error_ms=float(np.abs(residual).max()),
        samples=len(y),
    )


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares by trying every support (5 unknowns: 31 small solves).

    The optimum's positive coefficients solve the unconstrained problem on their own columns,
    so the best feasible subset solution is the NNLS optimum. Columns are scaled to unit norm
    first: event counts are ~1e3x the request counts.
    """
    norms = np.linalg.norm(x, axis=0)
    norms[norms == 0] = 1.0
    xs = x / norms
    best, best_sse = np.zeros(x.shape[1]), float((y**2).sum())
    for support in itertools.chain.from_iterable(
        itertools.combinations(range(x.shape[1]), k) for k in range(1, x.shape[1] + 1)
    ):
        cols = list(support)
        sol, *_ = np.linalg.lstsq(xs[:, cols], y, rcond=None)
        if (sol < 0).any():
            continue
        sse = float(((xs[:, cols] @ sol - y) ** 2).sum())
        if sse < best_sse - 1e-12:
            best = np.zeros(x.shape[1])
            best[cols] = sol
            best_sse = sse
    return best / norms
