"""Simulated time for the scheduler: one replica, one executor, a schedule of arrivals.

The scheduler takes ``now`` on every call, so a discrete-event loop can drive it with a
"true" batch-time function instead of a model: the scheduler's tests (ordering, rejection,
credits) run in milliseconds, and the serving bench reports an in-process run beside the
real Serve runs to separate the policy's effect from Serve's overhead (SERVING.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from components.latency_model import BatchShape
from components.slo_scheduler import Pending, SloScheduler


@dataclass(frozen=True)
class Arrival:
    """One scheduled request (times in ms from the schedule's start)."""

    at_ms: float
    request_id: str
    user_id: int
    candidates: int
    seq_len: int
    slo_class: str
    slo_ms: float  # deadline relative to ``at_ms``


@dataclass(frozen=True)
class Outcome:
    request_id: str
    slo_class: str
    status: int  # 200, 429 or 503
    reason: str
    latency_ms: float  # finish (or rejection) - arrival
    good: bool  # 200 and within its deadline
    degraded: bool = False


class UserCache:
    """LRU set of users whose side is cached (by count: the simulator has no bytes)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._users: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, user: int) -> bool:
        if user in self._users:
            self._users.move_to_end(user)
            return True
        return False

    def add(self, user: int) -> None:
        if self.capacity <= 0:
            return
        self._users[user] = None
        self._users.move_to_end(user)
        while len(self._users) > self.capacity:
            self._users.popitem(last=False)


def simulate(
    arrivals: Sequence[Arrival],
    scheduler: SloScheduler,
    batch_ms: Callable[[BatchShape], float],
    cache_users: int = 100_000,
) -> list[Outcome]:
    """Run ``arrivals`` through ``scheduler`` on one executor whose batches take ``batch_ms``."""
    pending = sorted(arrivals, key=lambda a: a.at_ms)
    cache = UserCache(cache_users)
    outcomes: list[Outcome] = []

    def answer(request: Pending, status: int, reason: str, at: float) -> None:
        good = status == 200 and at <= request.deadline_ms
        latency = at - request.arrival_ms
        outcomes.append(Outcome(request.request_id, request.slo_class, status, reason, latency, good, request.degraded))

    def arrive_until(end: float, inclusive: bool) -> None:
        """Submit every arrival up to ``end``, each at its own time."""
        nonlocal i
        while i < len(pending) and (pending[i].at_ms <= end if inclusive else pending[i].at_ms < end):
            a = pending[i]
            i += 1
            deadline = a.at_ms + a.slo_ms
            request = Pending(
                a.request_id, a.user_id, a.candidates, a.seq_len, a.user_id in cache, a.at_ms, deadline, a.slo_class
            )
            verdict = scheduler.submit(request, a.at_ms)
            if not verdict.accepted:
                answer(request, verdict.status, verdict.reason, a.at_ms)

    i, now = 0, 0.0
    while i < len(pending) or scheduler.queue:
        if not scheduler.queue:  # idle: jump to the next arrival
            now = max(now, pending[i].at_ms)
        arrive_until(now, inclusive=True)
        batch = scheduler.next_batch(now)
        for request, verdict in scheduler.drain_rejected():
            answer(request, verdict.status, verdict.reason, now)
        if batch is None:
            continue
        took = batch_ms(batch.shape)
        finish = now + took
        arrive_until(finish, inclusive=False)  # they queue behind the running batch
        for item in batch.items:
            cache.add(item.request.user_id)
        for request in scheduler.complete(batch, took, finish):
            answer(request, 200, "", finish)
        now = finish
    return outcomes


def summarize(outcomes: Sequence[Outcome], duration_ms: float) -> dict:
    """Goodput (good/s), attainment (good/offered) overall and per class, rejections by reason."""
    out: dict = {"offered": len(outcomes), "goodput_per_s": sum(o.good for o in outcomes) / (duration_ms / 1000.0)}
    out["attainment"] = float(np.mean([o.good for o in outcomes])) if outcomes else 0.0
    classes = sorted({o.slo_class for o in outcomes})
    out["by_class"] = {}
    for name in classes:
        rows = [o for o in outcomes if o.slo_class == name]
        served = [o.latency_ms for o in rows if o.status == 200]
        out["by_class"][name] = {
            "offered": len(rows),
            "attainment": float(np.mean([o.good for o in rows])),
            **{f"p{q}_ms": float(np.percentile(served, q)) if served else None for q in (50, 95, 99)},
        }
    out["rejected"] = {}
    for o in outcomes:
        if o.status != 200:
            out["rejected"][o.reason] = out["rejected"].get(o.reason, 0) + 1
    out["degraded"] = sum(o.degraded for o in outcomes)
    return out
