"""Seeded request schedules for open-loop load tests (SERVING.md: identical input for every policy).

A schedule is a list of requests with their send times: Poisson or gamma-bursty arrivals at an
offered rate, users drawn Zipf from the lake's users (a few heavy users, a long tail), a
heavy-tailed candidate count (Pareto, capped), and an SLO-class mix. It is saved as JSONL so
every policy, replica count and seed of a bench replays exactly the same requests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np


def _default_mix() -> dict[str, float]:
    return {"tight": 0.5, "normal": 0.3, "loose": 0.2}


@dataclass(frozen=True)
class LoadConfig:
    """The ``loadtest`` config section (pipelines/loadtest.py)."""

    rate_per_s: float = 20.0  # offered load
    duration_s: float = 20.0
    arrivals: Literal["poisson", "bursty"] = "poisson"
    burstiness: float = 4.0  # bursty: squared coefficient of variation of the gaps (gamma, shape 1/this)
    user_zipf: float = 1.2  # user popularity exponent (rank r drawn with weight r^-s)
    item_zipf: float = 1.0
    candidates_min: int = 10  # Pareto scale: the smallest request
    candidates_alpha: float = 1.5  # Pareto shape: heavy tail (mean = min * alpha / (alpha - 1))
    max_candidates: int = 500
    class_mix: dict[str, float] = field(default_factory=_default_mix)
    seed: int = 0
    # The generator process on a core of its own and the service's processes on the others, for
    # each run (pipelines/load_generator.py ``generator_core``). Off by default: measured on 2
    # cores it did not make the lag valid (the lag is the generator's own wake-up, README
    # "Quick runs of 2026-12-07") and it took a core from the service.
    pin_generator: bool = False

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and self.duration_s > 0):
            raise ValueError(
                f"loadtest.rate_per_s and duration_s must be > 0, got {self.rate_per_s}, {self.duration_s}"
            )
        if self.burstiness <= 0 or self.candidates_alpha <= 0 or self.user_zipf < 0 or self.item_zipf < 0:
            raise ValueError("loadtest.burstiness and candidates_alpha must be > 0, the Zipf exponents >= 0")
        if not 1 <= self.candidates_min <= self.max_candidates:
            raise ValueError(
                f"loadtest: need 1 <= candidates_min ({self.candidates_min}) <= max_candidates ({self.max_candidates})"
            )
        if not self.class_mix or any(w < 0 for w in self.class_mix.values()) or sum(self.class_mix.values()) <= 0:
            raise ValueError(f"loadtest.class_mix must have non-negative weights summing > 0, got {self.class_mix}")


@dataclass(frozen=True)
class ScheduledRequest:
    at_ms: float  # send time from the start of the run
    request_id: str
    user_id: int
    candidates: tuple[int, ...]
    slo_class: str

    def body(self) -> dict:
        return {
            "user_id": self.user_id,
            "candidates": list(self.candidates),
            "slo_class": self.slo_class,
            "request_id": self.request_id,
        }


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


def make_schedule(config: LoadConfig, users: Sequence[int], items: Sequence[int]) -> list[ScheduledRequest]:
    """The requests of one run (deterministic in ``config.seed``)."""
    if len(users) == 0 or len(items) == 0:
        raise ValueError("make_schedule needs at least one user and one item")
    rng = np.random.default_rng(config.seed)
    count = int(config.rate_per_s * config.duration_s * 1.5) + 16  # enough gaps; cut at duration
    mean_gap_ms = 1000.0 / config.rate_per_s
    if config.arrivals == "poisson":
        gaps = rng.exponential(mean_gap_ms, count)
    else:
        shape = 1.0 / config.burstiness
        gaps = rng.gamma(shape, mean_gap_ms / shape, count)
    times = np.cumsum(gaps)
    times = times[times < config.duration_s * 1000.0]
    user_order = rng.permutation(np.asarray(users, dtype=np.int64))  # which users are heavy: seeded
    item_order = rng.permutation(np.asarray(items, dtype=np.int64))
    user_pick = rng.choice(len(user_order), size=len(times), p=_zipf_weights(len(user_order), config.user_zipf))
    item_p = _zipf_weights(len(item_order), config.item_zipf)
    sizes = np.minimum(
        np.ceil(config.candidates_min * (1.0 + rng.pareto(config.candidates_alpha, len(times)))).astype(int),
        min(config.max_candidates, len(item_order)),
    )
    names = list(config.class_mix)
    mix = np.asarray([config.class_mix[n] for n in names], dtype=np.float64)
    classes = rng.choice(len(names), size=len(times), p=mix / mix.sum())
    out = []
    for i, at in enumerate(times):
        cands = rng.choice(len(item_order), size=int(sizes[i]), replace=False, p=item_p)
        out.append(
            ScheduledRequest(
                at_ms=round(float(at), 3),
                request_id=f"s{config.seed}-{i}",
                user_id=int(user_order[user_pick[i]]),
                candidates=tuple(int(x) for x in item_order[cands]),
                slo_class=names[classes[i]],
            )
        )
    return out


def write_schedule(path: str | Path, schedule: Sequence[ScheduledRequest]) -> None:
    with open(path, "w") as f:
        for request in schedule:
            f.write(json.dumps(asdict(request)) + "\n")


def read_schedule(path: str | Path) -> list[ScheduledRequest]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(ScheduledRequest(**{**row, "candidates": tuple(row["candidates"])}))
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{path}:{n} is not a scheduled request ({exc})") from exc
    if any(b.at_ms < a.at_ms for a, b in zip(out, out[1:])) or any(math.isnan(r.at_ms) for r in out):
        raise ValueError(f"{path}: send times must be numbers in non-decreasing order")
    return out
