"""The ranker replica as a Ray Serve deployment: ``RankerCore`` plus an asyncio scheduling loop.

``rank(request)`` admits the request into the replica's SLO scheduler (or answers 429/503 at
once) and awaits its future; one background task forms batches (``next_batch``), runs them on
a single compute thread (the event loop stays free to admit and reject meanwhile), and
resolves the futures. A client that disconnects cancels its future: the request leaves the
queue and its slot is free. A second task polls the lake for a new ``sequences`` version and
swaps it in without dropping requests (in-flight ones keep the version they started on).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import torch
from ray import serve

from components.config_loader import from_dict
from components.slo_scheduler import Batch, BatchItem, Pending, batch_shape
from serving.bundle_choice import load_served_bundle
from serving.config import ServeConfig
from serving.ranker_core import TASKS, RankerCore, Work
from serving.sequence_store import SequenceStore, latest_version

logger = logging.getLogger("ray.serve")


class RankerReplica:
    """Deployed by serving/app.py with options from ``ServeConfig`` (see ``ranker_deployment``)."""

    def __init__(self, bundle_path: str, lake_root: str, storage_options: dict, config: dict, metrics=None) -> None:
        self.config = from_dict(ServeConfig, config, "serve")
        torch.set_num_threads(self.config.torch_threads)
        self.lake_root, self.storage_options = lake_root, storage_options
        store = SequenceStore.load(lake_root, storage_options)
        # A bundle URI is fetched with the lake's options (replicas carry no store settings).
        bundle, self.weights = load_served_bundle(bundle_path, store, self.config, storage_options)
        self.core = RankerCore(bundle, store, self.config)
        started = time.perf_counter()
        report = self.core.profile()
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests construct the class directly)
            self.replica = "local"
        logger.info(
            "ranker %s ready: model %s, sequences v%d (%d users), latency fit R² %.3f, MAPE %.3f in %.1f s",
            self.replica,
            self.core.bundle.model_version,
            store.version,
            store.user_ids.size,
            report.r2,
            report.mape,
            time.perf_counter() - started,
        )
        self.metrics = metrics
        if self.config.batching == "stock":
            self._stock_batch.set_max_batch_size(self.config.stock_max_batch_size)
            self._stock_batch.set_batch_wait_timeout_s(self.config.stock_batch_wait_timeout_s)
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="ranker-compute")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="ranker-io")
        self._wake: asyncio.Event | None = None
        self._batches_running, self._last_batch = 0, 0.0
        self._tasks: list[asyncio.Task] = []
        self.loop_error: BaseException | None = None

    # ---------------------------------------------------------------- requests
    async def rank(self, request: dict[str, Any]) -> dict[str, Any]:
        """``request``: user_id, candidates, deadline_ms (relative to ``received_s``, wall clock),
        request_id, slo_class, optional request_ts. Returns the response body plus ``status``."""
        self._start()
        if self.config.batching == "stock":
            return await self._stock_batch(request)
        pending = self._pending(request)
        verdict = self.core.scheduler.submit(pending, pending.arrival_ms)
        if not verdict.accepted:
            return self._rejection(verdict.status, verdict.reason, verdict.retry_after_s)
        work: Work = pending.payload
        work.future = asyncio.get_running_loop().create_future()
        self._wake.set()
        try:
            status, reason = await work.future
        except asyncio.CancelledError:  # the client went away: free its slot now
            self.core.scheduler.cancel(pending)
            raise
        if status != 200:
            return self._rejection(status, reason, self.config.scheduler.retry_after_s)
        return self._response(pending)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _stock_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The stock baseline: Serve's FIFO batcher, every request admitted, one batch per call."""
        pending = [self._pending(request) for request in requests]
        items = tuple(BatchItem(p, 0, p.candidates) for p in pending)
        batch = Batch(items, batch_shape(items), 0.0)
        await self._run_batch(batch)
        for p in pending:
            p.served = p.target
        return [self._response(p) for p in pending]

    def _pending(self, request: dict[str, Any]) -> Pending:
        now_ms = time.monotonic() * 1000.0
        waited_ms = max(time.time() - request["received_s"], 0.0) * 1000.0  # ingress and transit
        pending = self.core.make_request(
            request["request_id"],
            request["user_id"],
            request["candidates"],
            now_ms + request["deadline_ms"] - waited_ms,
            now_ms,
            request.get("request_ts") or time.time(),
        )
        pending.slo_class = request["slo_class"]
        pending.allow_degraded = request.get("allow_degraded")
        pending.payload.waited_ms = waited_ms
        return pending

    def _response(self, pending: Pending) -> dict[str, Any]:
        work: Work = pending.payload
        scored = pending.target
        scores = [
            {"item_id": int(item), **{task: float(p) for task, p in zip(TASKS, work.scores[i])}}
            for i, item in enumerate(work.candidates[:scored])
        ]
        elapsed_ms = time.monotonic() * 1000.0 - pending.arrival_ms
        return {
            "status": 200,
            "request_id": pending.request_id,
            "user_id": pending.user_id,
            "scores": scores,
            "degraded": pending.degraded,
            "unscored": [int(x) for x in work.candidates[scored:]],
            "cache_hit": bool(work.cache_hit),
            "replica": self.replica,
            "queue_ms": round(max(elapsed_ms - work.compute_ms, 0.0) + work.waited_ms, 3),
            "compute_ms": round(work.compute_ms, 3),
            "model_version": self.core.bundle.model_version,
            "sequence_version": work.key.sequence_version,
        }

    def _rejection(self, status: int, reason: str, retry_after_s: float) -> dict[str, Any]:
        return {"status": status, "reason": reason, "retry_after_s": retry_after_s, "replica": self.replica}

    # ---------------------------------------------------------------- the loop
    def _start(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
            loops = (self._serve_batches(), self._watch_sequences(), self._report_metrics(), self._prewarm())
            self._tasks = [asyncio.create_task(loop) for loop in loops]

    async def _serve_batches(self) -> None:
        scheduler = self.core.scheduler
        try:
            while True:
                if not scheduler.queue:
                    self._wake.clear()
                    await self._wake.wait()
                batch = scheduler.next_batch(time.monotonic() * 1000.0)
                for request, verdict in scheduler.drain_rejected():
                    _resolve(request.payload, (verdict.status, verdict.reason))
                if batch is None:
                    continue
                took = await self._run_batch(batch)
                for request in scheduler.complete(batch, took, time.monotonic() * 1000.0):
                    _resolve(request.payload, (200, ""))
        except BaseException as exc:  # noqa: BLE001 - surfaces through check_health
            self.loop_error = exc
            for request in scheduler.queue:
                _resolve(request.payload, (503, "replica_error"))
            raise

    async def _watch_sequences(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.sequence_poll_s)
            try:
                version = await loop.run_in_executor(self._io, latest_version, self.lake_root, self.storage_options)
                if version != self.core.store.version:
                    store = await loop.run_in_executor(
                        self._io, SequenceStore.load, self.lake_root, self.storage_options, version
                    )
                    dropped = self.core.swap_store(store)
                    logger.info("sequences v%d loaded (%d cache entries dropped)", version, dropped)
            except Exception:  # noqa: BLE001 - keep serving the version we have
                logger.exception("sequences reload failed; still serving v%d", self.core.store.version)

    async def _run_batch(self, batch: Batch) -> float:
        """``RankerCore.run_batch`` on the compute thread, marked busy for pre-warm meanwhile."""
        self._batches_running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._compute, self.core.run_batch, batch)
        finally:
            self._batches_running -= 1
            self._last_batch = time.monotonic()

    async def _prewarm(self) -> None:
        """While the replica is idle (no queue, no batch, none for ``PREWARM_IDLE_S``), compute one
        recently seen user's state at a time on the compute thread (``RankerCore.prewarm``)."""
        loop = asyncio.get_running_loop()
        if not self.config.prewarm_users or not self.config.cache:
            return
        while True:
            await asyncio.sleep(PREWARM_IDLE_S)
            idle = time.monotonic() - self._last_batch >= PREWARM_IDLE_S
            if self.core.scheduler.queue or self._batches_running or not idle:
                continue
            try:
                job = self.core.prewarm_next(time.time())
                if job is not None:
                    await loop.run_in_executor(self._compute, self.core.prewarm, *job)
            except Exception:  # noqa: BLE001 - a failed pre-warm is a later miss, never an outage
                logger.exception("pre-warm failed; pausing it for a minute")
                await asyncio.sleep(60.0)

    async def _report_metrics(self) -> None:
        """Push a snapshot to the metrics hub every second while anything changed."""
        last = None
        while self.metrics is not None:
            mark = self._activity()
            if mark != last:
                self.metrics.report.remote(self.replica, self.snapshot())
                last = mark
            await asyncio.sleep(1.0)

    def _activity(self) -> tuple:
        """Changes whenever a snapshot would (what ``_report_metrics`` watches)."""
        stats = self.core.scheduler.stats
        queue = len(self.core.scheduler.queue)
        version, prewarmed = self.core.store.version, self.core.stats.prewarmed
        return (stats.submitted, stats.batches, stats.completed, stats.cancelled, queue, version, prewarmed)

    # ---------------------------------------------------------------- health and stats
    def check_health(self) -> None:
        if self.loop_error is not None:
            raise RuntimeError(f"ranker loop died: {self.loop_error!r}")

    def ready(self) -> dict[str, Any]:
        return {"replica": self.replica, "pid": os.getpid(), "model_version": self.core.bundle.model_version}

    def snapshot(self) -> dict[str, Any]:
        """Counters for /metrics and the benches."""
        core = self.core
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "model_version": core.bundle.model_version,
            "sequence_version": core.store.version,
            "core": asdict(core.stats),
            "cache": asdict(core.cache.stats),
            "scheduler": asdict(core.scheduler.stats),
            "queue": len(core.scheduler.queue),
            "latency_fit": core.fit_report.as_dict() if core.fit_report else {},
            "latency_scale": core.latency.scale,
            "latency_live": core.latency.live.as_dict() if core.latency.live else {},
            "latency_refits": core.latency.refits,
            "weights": self.weights.as_dict(),
        }


def _resolve(work: Work, outcome: tuple[int, str]) -> None:
    if work.future is not None and not work.future.done():
        work.future.set_result(outcome)


# Pre-warm waits for this much idle time after the last batch and between users: a request
# arriving while it runs waits for at most one user's encode.
PREWARM_IDLE_S = 0.05

# How often a stopping replica looks whether its requests have drained. Serve's default, 2 s, is
# slept before the first look, so every idle replica took >= 2 s to stop and a redeploy or
# shutdown of the app's three deployments (stopped one after another) >= 6 s; the look is a
# counter read, cheap at any rate.
DRAIN_CHECK_S = 0.2


def ranker_options(config: ServeConfig) -> dict[str, Any]:
    """Serve deployment options of the ranker replicas: the config's replicas, CPUs, admission and
    routing (serving/app.py deploys ``serving.ingress.RankingService`` with them)."""
    from ray.serve.config import RequestRouterConfig

    options: dict[str, Any] = {
        "name": "Ranker",
        "num_replicas": config.num_replicas,
        "ray_actor_options": {"num_cpus": config.replica_cpus},
        "max_ongoing_requests": config.ranker_max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "health_check_period_s": 2.0,
        "graceful_shutdown_timeout_s": 5.0,
        "graceful_shutdown_wait_loop_s": DRAIN_CHECK_S,
        "logging_config": {"enable_access_log": config.access_log},
    }
    if config.routing == "affinity":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class="serving.router:UserAffinityRouter",
            request_router_kwargs={"bounded_load": config.bounded_load},
        )
    return options
