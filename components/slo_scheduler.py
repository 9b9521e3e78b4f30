"""SLO-aware request scheduler of a ranker replica (SERVING.md; SCORPIO, arXiv 2505.23022).

Plain Python, no Serve and no clock of its own: every call takes ``now`` (ms), so the same
code runs in a replica (``time.monotonic()``) and in simulated time
(``components/slo_simulation.py``). The replica's loop is::

    verdict = scheduler.submit(request, now)          # 429 overloaded / 503 slo_unattainable / queued
    batch = scheduler.next_batch(now)                 # also rejects what can no longer make it
    for request, verdict in scheduler.drain_rejected(): answer(request, verdict)
    ... score batch.items ...
    finished = scheduler.complete(batch, measured_ms, now)

Policies (``SchedulerConfig.policy``), all on the same queue and predictor:

- ``slo`` (ours): slack-ordered (earliest deadline first) queue; early rejection — walk the
  queue accumulating the predicted work ahead and reject (or degrade) whatever would miss its
  deadline with margin; a greedy EDF batch former whose batch time must fit the tightest
  completing request's slack and a candidate budget; large requests split into candidate
  chunks that keep batches short (``batch_quantum_ms``: a tight request arriving meanwhile
  never waits behind one long batch) yet never smaller than their *credit* (a request earns
  ``remaining / slack`` candidates per ms: the service it is owed to finish in time).
- ``edf``: the same order, no rejection and no time-aware batch sizing (baseline 2).
- ``reject_on_arrival``: FIFO, and a request is rejected at arrival if the queued work ahead
  plus its own would miss its deadline; never afterwards (Mooncake-style, baseline 3).
- ``fifo``: arrival order, no rejection (the in-process twin of ``@serve.batch``, baseline 1).

Every policy bounds the queue (429 ``overloaded`` with Retry-After beyond ``max_queue``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from components.latency_model import BatchShape, LatencyModel

POLICIES = ("slo", "edf", "reject_on_arrival", "fifo")


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of one replica's scheduler (the ``serve.scheduler`` config section)."""

    policy: Literal["slo", "edf", "reject_on_arrival", "fifo"] = "slo"
    max_queue: int = 256  # requests waiting; one more is answered 429 overloaded
    max_batch_candidates: int = 2048  # candidate budget of one batch (memory, and the latency cap)
    max_batch_requests: int = 64
    # SCORPIO plans with prediction x 1.3 + 50 ms on LLM steps of ~100 ms. A ranking batch is
    # ~10x shorter and our predictor's held-out error is ~8% (bench serving: predictor_mape), so
    # about 2x that error plus a little: a larger margin rejects requests that would have made it
    # (the first quick bench lost 12% of the tight class that way at 0.8x load).
    margin_factor: float = 1.15
    margin_ms: float = 2.0
    chunk_candidates: int = 64  # smallest chunk a large request is split into
    # A large request's chunks keep a batch near this long, so a tight request arriving during
    # it waits about this much at most (SERVING.md: large loose requests never block tight ones).
    batch_quantum_ms: float = 10.0
    # Instead of 503, score fewer candidates when that fits; a request's own ``allow_degraded``
    # (POST /rank) overrides this default either way.
    degrade: bool = False
    min_degraded_candidates: int = 8
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"scheduler.policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("max_queue", "max_batch_candidates", "max_batch_requests", "chunk_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"scheduler.{name} must be >= 1, got {getattr(self, name)}")
        if self.margin_factor < 1.0 or self.margin_ms < 0:
            raise ValueError(
                f"scheduler margins must be margin_factor >= 1 and margin_ms >= 0, "
                f"got {self.margin_factor} and {self.margin_ms}"
            )
        if self.batch_quantum_ms <= 0:
            raise ValueError(f"scheduler.batch_quantum_ms must be > 0, got {self.batch_quantum_ms}")
        if self.min_degraded_candidates < 1:
            raise ValueError(f"scheduler.min_degraded_candidates must be >= 1, got {self.min_degraded_candidates}")
        if self.retry_after_s <= 0:
            raise ValueError(f"scheduler.retry_after_s must be > 0, got {self.retry_after_s}")


@dataclass(eq=False)
class Pending:
    """One admitted request as the scheduler tracks it (times in ms on the caller's clock).

    ``candidates`` is what the client sent; ``target`` what will be scored (smaller only when
    degraded); ``served`` how many of the first ``target`` are scored so far (chunks).
    ``payload`` is the caller's (the replica's future and tensors); the scheduler never reads it.
    """

    request_id: str
    user_id: int
    candidates: int
    seq_len: int  # events in the user's history the model reads (its user-side cost)
    cached: bool  # the user's encode_user output is in this replica's cache
    arrival_ms: float
    deadline_ms: float  # absolute, on the same clock as arrival_ms
    slo_class: str = "normal"
    allow_degraded: bool | None = None  # the request's opt-in; None: SchedulerConfig.degrade
    payload: Any = None
    target: int = 0
    served: int = 0
    credit: float = 0.0
    credit_ms: float = 0.0
    degraded: bool = False

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ValueError(f"request {self.request_id}: candidates must be >= 1, got {self.candidates}")
        self.target = self.target or self.candidates
        self.credit_ms = self.arrival_ms

    @property
    def remaining(self) -> int:
        return self.target - self.served


@dataclass(frozen=True)
class Verdict:
    """The answer to a request the scheduler will not (fully) serve, or ``queued``."""

    status: int  # 200 queued, 429 overloaded, 503 slo_unattainable
    reason: str = ""
    retry_after_s: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.status == 200


QUEUED = Verdict(200, "queued")


@dataclass(frozen=True)
class BatchItem:
    """Candidates ``[start, start + count)`` of ``request`` are scored in this batch."""

    request: Pending
    start: int
    count: int

    @property
    def completes(self) -> bool:
        return self.start + self.count == self.request.target


@dataclass(frozen=True)
class Batch:
    items: tuple[BatchItem, ...]
    shape: BatchShape
    predicted_ms: float  # the predictor's estimate, before margins

    @property
    def candidates(self) -> int:
        return sum(item.count for item in self.items)


@dataclass
class SchedulerStats:
    """Counters the replica exports (/metrics) and the benches report."""

    submitted: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {"overloaded": 0, "slo_unattainable": 0})
    degraded: int = 0
    batches: int = 0
    chunks: int = 0  # batch items that scored part of a request
    completed: int = 0
    cancelled: int = 0  # clients that went away while queued


class SloScheduler:
    """The queue, the admission and rejection rules and the batch former of one replica."""

    def __init__(self, config: SchedulerConfig, model: LatencyModel) -> None:
        self.config = config
        self.model = model
        self.queue: list[Pending] = []
        self.stats = SchedulerStats()
        self._rejected: list[tuple[Pending, Verdict]] = []

    # ---------------------------------------------------------------- admission
    def submit(self, request: Pending, now: float) -> Verdict:
        """Queue ``request`` or answer it now (429 overloaded, 503 slo_unattainable)."""
        self.stats.submitted += 1
        cfg = self.config
        if len(self.queue) >= cfg.max_queue:
            return self._reject(request, "overloaded", 429, record=False)
        if cfg.policy in ("slo", "reject_on_arrival"):
            ahead = self._work_ms(self.queue) if cfg.policy == "reject_on_arrival" else 0.0
            if not self._fits(request, now, ahead):
                return self._reject(request, "slo_unattainable", 503, record=False)
        self.queue.append(request)
        return QUEUED

    def cancel(self, request: Pending) -> bool:
        """Forget a queued request whose client went away; False if it is not queued (finished,
        rejected, or unknown). A request inside a running batch is finished and then dropped."""
        before = len(self.queue)
        self.queue = [r for r in self.queue if r is not request]
        if len(self.queue) < before:
            self.stats.cancelled += 1
            return True
        return False

    def drain_rejected(self) -> list[tuple[Pending, Verdict]]:
        """Requests rejected from the queue since the last call (the caller answers them)."""
        out, self._rejected = self._rejected, []
        return out

    # ---------------------------------------------------------------- batching
    def next_batch(self, now: float) -> Batch | None:
        """The batch to run now, or None if the queue is empty."""
        if self.config.policy == "slo":
            self._reject_unattainable(now)
        if not self.queue:
            return None
        if self.config.policy == "slo":
            items = self._form_slo(now)
        else:
            order = self._by_deadline() if self.config.policy == "edf" else list(self.queue)
            items = self._form_greedy(order)
        shape = batch_shape(items)
        self.stats.batches += 1
        self.stats.chunks += sum(not (item.start == 0 and item.completes) for item in items)
        return Batch(tuple(items), shape, self.model.predict_ms(shape))

    def complete(self, batch: Batch, actual_ms: float, now: float) -> list[Pending]:
        """Account an executed batch; returns the requests it finished (removed from the queue)."""
        self.model.observe(batch.shape, actual_ms)
        users = set()
        finished = []
        for item in batch.items:
            item.request.served += item.count
            users.add(item.request.user_id)
            if item.request.remaining == 0:
                finished.append(item.request)
        done = {id(r) for r in finished}
        self.queue = [r for r in self.queue if id(r) not in done]
        for request in self.queue:  # the batch encoded these users: their next chunks are hits
            if request.user_id in users:
                request.cached = True
        self.stats.completed += len(finished)
        return finished

    # ---------------------------------------------------------------- internals
    def _by_deadline(self) -> list[Pending]:
        return sorted(self.queue, key=lambda r: (r.deadline_ms, r.arrival_ms))

    def _request_ms(self, request: Pending, count: int | None = None) -> float:
        """Predicted work of scoring ``count`` (default: all remaining) of ``request``'s candidates."""
        count = request.remaining if count is None else count
        user = 0.0 if request.cached else self.model.user_side_ms(request.seq_len)
        return user + count * self.model.candidate_ms(request.seq_len)

    def _work_ms(self, requests: Iterable[Pending]) -> float:
        requests = list(requests)
        if not requests:
            return 0.0
        batches = math.ceil(sum(r.remaining for r in requests) / self.config.max_batch_candidates)
        return batches * self.model.overhead_ms() + sum(self._request_ms(r) for r in requests)

    def _planned(self, ms: float) -> float:
        return ms * self.config.margin_factor + self.config.margin_ms

    def _fits(self, request: Pending, now: float, ahead_ms: float) -> bool:
        """Can ``request`` still finish by its deadline after ``ahead_ms`` of work? Degrades it
        (fewer candidates) instead of failing when configured and enough candidates fit."""
        own = self.model.overhead_ms() + self._request_ms(request)
        if now + self._planned(ahead_ms + own) <= request.deadline_ms:
            return True
        if not (self.config.degrade if request.allow_degraded is None else request.allow_degraded):
            return False
        slack = (request.deadline_ms - now - self.config.margin_ms) / self.config.margin_factor - ahead_ms
        fixed = self.model.overhead_ms() + self._request_ms(request, 0)
        per = self.model.candidate_ms(request.seq_len)
        fit = math.floor((slack - fixed) / per + 1e-9) if per > 0 else request.remaining  # 1e-9: 5.0 / 0.1 is 49.99..
        fit = min(fit, request.remaining)
        if fit < self.config.min_degraded_candidates:
            return False
        request.target = request.served + fit
        if not request.degraded:
            request.degraded = True
            self.stats.degraded += 1
        return True

    def _reject(self, request: Pending, reason: str, status: int, record: bool = True) -> Verdict:
        self.stats.rejected[reason] += 1
        verdict = Verdict(status, reason, self.config.retry_after_s)
        if record:
            self._rejected.append((request, verdict))
        return verdict

    def _reject_unattainable(self, now: float) -> None:
        """The early-rejection walk: in deadline order, accumulate the predicted work ahead; a
        request that would miss its deadline even so is rejected now (its work is not counted
        for those behind it), while it could still be retried elsewhere in time."""
        ahead, keep = [], []
        for request in self._by_deadline():
            if request.served == 0 and not self._fits(request, now, self._work_ms(ahead)):
                self._reject(request, "slo_unattainable", 503)
                continue
            ahead.append(request)
            keep.append(request)
        kept = {id(r) for r in keep}
        self.queue = [r for r in self.queue if id(r) in kept]

    def _form_greedy(self, order: list[Pending]) -> list[BatchItem]:
        """Whole requests in ``order`` up to the candidate and request caps (always at least one)."""
        cfg, items, total = self.config, [], 0
        for request in order:
            if items and (total + request.remaining > cfg.max_batch_candidates or len(items) >= cfg.max_batch_requests):
                break
            items.append(BatchItem(request, request.served, request.remaining))
            total += request.remaining
        return items

    def _form_slo(self, now: float) -> list[BatchItem]:
        """Greedy EDF under the candidate budget and the tightest completing deadline; large
        requests go in chunks (see the module docstring).

        A large request's chunk is what fills the batch up to ``batch_quantum_ms`` — short
        batches, so a tight request arriving meanwhile waits one quantum at most — but never
        less than its credit: service it is owed to finish by its own deadline.
        """
        cfg = self.config
        order = self._by_deadline()
        for request in order:  # credits accrue at the rate that finishes the request just in time
            rate = request.remaining / max(request.deadline_ms - now, 1.0)
            request.credit += rate * max(now - request.credit_ms, 0.0)
            request.credit_ms = now
        counts: dict[int, int] = {}

        def plan(extra: Pending, count: int) -> list[BatchItem]:
            chosen = [BatchItem(r, r.served, counts[id(r)]) for r in order if id(r) in counts]
            return [*chosen, BatchItem(extra, extra.served, count)]

        def feasible(trial: list[BatchItem], late: Pending | None = None) -> bool:
            """Within the budget, and every request it completes (but ``late``) meets its deadline."""
            if sum(item.count for item in trial) > cfg.max_batch_candidates:
                return False
            finish = now + self._planned(self.model.predict_ms(batch_shape(trial)))
            return all(finish <= i.request.deadline_ms for i in trial if i.completes and i.request is not late)

        def quick(trial: list[BatchItem]) -> bool:
            return self.model.predict_ms(batch_shape(trial)) <= cfg.batch_quantum_ms

        for request in order:
            if len(counts) >= cfg.max_batch_requests:
                break
            if request.remaining <= 2 * cfg.chunk_candidates:  # small: whole or not at all
                if feasible(plan(request, request.remaining)):
                    counts[id(request)] = request.remaining
                continue
            whole_ms = self._planned(self.model.overhead_ms() + self._request_ms(request))
            if now + whole_ms + cfg.batch_quantum_ms >= request.deadline_ms:
                want = request.remaining  # the last moment: one more quantum and it is late
            else:
                want = max(
                    min(int(request.credit), request.remaining),
                    _largest(request.remaining, lambda c, r=request: quick(plan(r, c))),
                    0 if counts else cfg.chunk_candidates,
                )
            # Its own deadline is only a constraint when this chunk finishes it, and then a
            # smaller chunk would not help it: leave no tail shorter than a chunk behind.
            take = _largest(want, lambda c, r=request: feasible(plan(r, c), late=r))
            if 0 < request.remaining - take < cfg.chunk_candidates:
                take = request.remaining - cfg.chunk_candidates
            if take >= cfg.chunk_candidates or (take == request.remaining and take > 0):
                counts[id(request)] = take
        if not counts:  # nothing fits its deadline: serve the most urgent anyway (it was admitted)
            first = order[0]
            counts[id(first)] = min(first.remaining, cfg.max_batch_candidates)
        items = [BatchItem(r, r.served, counts[id(r)]) for r in order if id(r) in counts]
        for item in items:
            item.request.credit = max(item.request.credit - item.count, 0.0)
        return items


def _largest(limit: int, ok) -> int:
    """The largest ``c`` in [0, limit] with ``ok(c)`` (``ok`` monotone: true up to some point)."""
    if limit <= 0 or not ok(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def batch_shape(items: Iterable[BatchItem]) -> BatchShape:
    """The predictor's view of a batch: a user's side is computed once per batch even when
    several of its requests (or chunks) are in it."""
    seen: set[int] = set()
    candidates, seq_lens, cached = [], [], []
    for item in items:
        request = item.request
        first = request.user_id not in seen
        seen.add(request.user_id)
        candidates.append(item.count)
        seq_lens.append(request.seq_len)
        cached.append(request.cached or not first)
    return BatchShape(tuple(candidates), tuple(seq_lens), tuple(cached))
