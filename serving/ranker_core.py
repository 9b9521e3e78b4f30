"""A ranker replica's work, without Serve: requests in, scores out, user side cached.

``RankerCore`` owns the model of a bundle, the replica's sequence store, the user-side cache,
the latency model (fitted by a profiling sweep) and the SLO scheduler. The Serve deployment
(serving/ranker.py) only adds the asyncio loop; the serving bench drives the same object
in-process to separate the policy's effect from Serve's overhead.

A batch is a list of (request, candidate range) items. Per item: the user side comes from the
cache (key: user, model version, sequences version, quantised request time) or from
``encode_user`` (then cached); then one ``score_candidates`` call scores the candidates of
every item against its user's state (states stacked, candidate ranges padded). A hit is the
very state a miss computes, so cached and uncached scores are identical.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from components.bundle import Bundle
from components.latency_model import FitReport, LatencyModel
from components.slo_scheduler import Batch, BatchItem, Pending, SloScheduler, batch_shape
from models.batch import GroupBatch
from serving.config import ServeConfig
from serving.featurizer import Featurized, Featurizer
from serving.sequence_store import History, SequenceStore
from serving.user_cache import CacheKey, CacheStats, UserSideCache

logger = logging.getLogger(__name__)

TASKS = ("engage", "like")


@dataclass
class Work:
    """What the replica keeps about one admitted request (``Pending.payload``)."""

    candidates: np.ndarray  # (N,) int64 raw item ids
    request_ts: int  # quantised
    key: CacheKey
    history: History  # read at admission from the sequences version its key names
    scores: np.ndarray  # (N, tasks) float32, filled chunk by chunk
    featurized: Featurized | None = None
    cache_hit: bool | None = None  # at its first chunk
    compute_ms: float = 0.0
    future: Any = None  # the Serve replica's asyncio future (serving/ranker.py)
    waited_ms: float = 0.0  # between the ingress receiving it and the replica admitting it


@dataclass
class CoreStats:
    requests: int = 0
    unknown_users: int = 0
    unknown_items: int = 0
    rare_users: int = 0  # known ids that read the shared row (models/id_rows.py)
    rare_items: int = 0
    batches: int = 0
    compute_ms: float = 0.0
    prewarmed: int = 0  # user states computed off the request path (``prewarm``)
    prewarm_ms: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # requests per batch -> count


class RankerCore:
    """One replica's model, store, cache, predictor and scheduler (see module docstring)."""

    def __init__(self, bundle: Bundle, store: SequenceStore, config: ServeConfig, latency: LatencyModel | None = None):
        self.bundle = bundle
        self.config = config
        self.featurizer = Featurizer(bundle)
        self.store = store
        self.cache = UserSideCache(config.cache_bytes if config.cache else 0, config.cache_ttl_s)
        self.latency = latency or LatencyModel()
        self.scheduler = SloScheduler(config.scheduler, self.latency)
        self.stats = CoreStats()
        self.fit_report: FitReport | None = None
        self.profile_samples: tuple[list, list[float]] = ([], [])
        # The cache is priced from the event loop (make_request) and filled from the compute
        # thread (run_batch): one lock around it.
        self._cache_lock = threading.Lock()
        # Users seen lately, oldest first (monotonic time of their last request): who pre-warm
        # serves, newest first.
        self._recent: OrderedDict[int, float] = OrderedDict()
        self._state_bytes = 0  # the size of the last user state cached (what pre-warm needs room for)

    # ---------------------------------------------------------------- requests
    def quantise_ts(self, request_ts: float) -> int:
        step = self.config.request_ts_granularity_s
        return int(request_ts // step) * step

    def make_request(
        self, request_id: str, user_id: int, candidates: list[int], deadline_ms: float, now_ms: float, request_ts: float
    ) -> Pending:
        """A scheduler entry for a validated request (``now_ms``/``deadline_ms`` on the monotonic clock)."""
        ts = self.quantise_ts(request_ts)
        store = self.store
        key = self._key(store, user_id, ts)
        cand = np.asarray(candidates, dtype=np.int64)
        history = self.featurizer.history(store, user_id, ts)
        work = Work(cand, ts, key, history, np.zeros((len(cand), len(TASKS)), np.float32))
        with self._cache_lock:
            cached = self.cache.contains(key, time.monotonic())
        self.stats.requests += 1
        self._note_user(user_id)
        return Pending(request_id, user_id, len(cand), len(history), cached, now_ms, deadline_ms, payload=work)

    def _key(self, store: SequenceStore, user_id: int, ts: int) -> CacheKey:
        """The cache key of ``user_id``'s state at quantised time ``ts`` read from ``store``."""
        return CacheKey(user_id, self.bundle.model_version, store.version, ts)

    # ---------------------------------------------------------------- compute
    @torch.inference_mode()
    def run_batch(self, batch: Batch) -> float:
        """Score every item of ``batch`` into its request's ``Work.scores``; returns the compute ms."""
        started = time.perf_counter()
        states: dict[CacheKey, object] = {}  # one user side per batch, cached or not
        rows, chunks = [], []  # per batch item: its user state and its candidate slice
        for item in batch.items:
            work: Work = item.request.payload
            if work.featurized is None:
                user = item.request.user_id
                work.featurized = self.featurizer.featurize(user, work.candidates, work.request_ts, work.history)
                self.stats.unknown_users += work.featurized.unknown_user
                self.stats.unknown_items += work.featurized.unknown_items
                self.stats.rare_users += work.featurized.rare_user
                self.stats.rare_items += work.featurized.rare_items
            state = states.get(work.key)
            if state is None:
                state = self._cached(work.key)
                if work.cache_hit is None:
                    work.cache_hit = state is not None
                if state is None:
                    state = self.bundle.model.encode_user(work.featurized.batch)
                    self._store(work.key, state)
                states[work.key] = state
            elif work.cache_hit is None:
                work.cache_hit = True
            rows.append(state)
            chunks.append(work.featurized.batch.candidate_slice(torch.arange(item.start, item.start + item.count)))
        # The candidate side of every item in one call: the states stacked one row per item, the
        # candidate slices right-padded to the largest (padded slots are masked and touch nothing).
        if len(rows) == 1:
            state, chunk = rows[0], chunks[0]
        else:
            state, chunk = type(rows[0]).cat(rows), GroupBatch.stack(chunks)
        probs = torch.sigmoid(self.bundle.model.score_candidates(state, chunk).logits).numpy()  # (items, N, tasks)
        for row, item in enumerate(batch.items):
            item.request.payload.scores[item.start : item.start + item.count] = probs[row, : item.count]
        took = (time.perf_counter() - started) * 1000.0
        for item in batch.items:
            item.request.payload.compute_ms += took * item.count / max(batch.candidates, 1)
        self.stats.batches += 1
        self.stats.compute_ms += took
        size = len(batch.items)
        self.stats.batch_sizes[size] = self.stats.batch_sizes.get(size, 0) + 1
        return took

    def _cached(self, key: CacheKey):
        if not self.config.cache:
            return None
        with self._cache_lock:
            return self.cache.get(key, time.monotonic())

    def _store(self, key: CacheKey, state) -> None:
        if self.config.cache:
            self._state_bytes = state.nbytes()
            with self._cache_lock:
                self.cache.put(key, state, self._state_bytes, time.monotonic())

    def score_now(self, user_id: int, candidates: list[int], request_ts: float) -> tuple[np.ndarray, bool]:
        """Score one request outside the scheduler (tests, warm-up): (scores (N, tasks), cache hit)."""
        now = time.monotonic() * 1000.0
        request = self.make_request("direct", user_id, candidates, now + 1e9, now, request_ts)
        items = (_whole(request),)
        batch = Batch(items, batch_shape(items), 0.0)
        self.run_batch(batch)
        return request.payload.scores, bool(request.payload.cache_hit)

    # ---------------------------------------------------------------- pre-warm
    def _note_user(self, user_id: int) -> None:
        if not self.config.prewarm_users:
            return
        self._recent[user_id] = time.monotonic()
        self._recent.move_to_end(user_id)
        while len(self._recent) > self.config.prewarm_users:
            self._recent.popitem(last=False)

    def prewarm_next(self, now_ts: float) -> tuple[int, int] | None:
        """The next (user, quantised request time) whose user state pre-warm should compute: a
        user seen within the cache's TTL, newest first, without a cached state for the current
        time window, or for the next one when it starts within ``serve.prewarm_lead_s``. None
        when every recent user is warm, when the cache has no room for another state without
        evicting one, or when the cache is off."""
        if not self.config.cache or not self._recent:
            return None
        if self.cache.stats.bytes + self._state_bytes > self.cache.max_bytes:
            return None  # pre-warm never evicts: at idle, evicting to warm would churn forever
        now = time.monotonic()
        windows = [self.quantise_ts(now_ts)]
        ahead = self.quantise_ts(now_ts + self.config.prewarm_lead_s)
        if ahead != windows[0]:
            windows.append(ahead)
        store = self.store
        with self._cache_lock:
            for user, seen in reversed(self._recent.items()):
                if now - seen > self.config.cache_ttl_s:
                    break  # older ones are older still
                for ts in windows:
                    if not self.cache.contains(self._key(store, user, ts), now):
                        return user, ts
        return None

    @torch.inference_mode()
    def prewarm(self, user_id: int, request_ts: int) -> bool:
        """Compute and cache ``user_id``'s state for the window of ``request_ts`` exactly as a miss
        would (same key, same history cut); False if it is already there."""
        started = time.perf_counter()
        ts = self.quantise_ts(request_ts)
        store = self.store
        key = self._key(store, user_id, ts)
        if self._cached(key) is not None:
            return False
        history = self.featurizer.history(store, user_id, ts)
        # One candidate: the user side reads no candidate field (a hit serves any candidates).
        one = self.featurizer.items["item_ids"][:1]
        featurized = self.featurizer.featurize(user_id, one, ts, history)
        self._store(key, self.bundle.model.encode_user(featurized.batch))
        self.stats.prewarmed += 1
        self.stats.prewarm_ms += (time.perf_counter() - started) * 1000.0
        return True

    # ---------------------------------------------------------------- store and profile
    def swap_store(self, store: SequenceStore) -> int:
        """Serve a new ``sequences`` version from now on; drops the cache entries of the old one."""
        self.store = store
        with self._cache_lock:
            return self.cache.retain(self.bundle.model_version, store.version)

    def profile(self, rng_seed: int = 0) -> FitReport:
        """Fit the latency model on a sweep of real batches: users of the store (short and long
        histories), candidate counts from 1 to ``max_candidates``, cached and not. Clears the cache."""
        rng = np.random.default_rng(rng_seed)
        users = self.store.user_ids
        if users.size == 0:
            raise ValueError("profile: the sequence store has no users")
        item_ids = self.featurizer.items["item_ids"]
        lengths = np.diff(self.store.offsets)
        by_length = users[np.argsort(lengths)]
        shapes, times = [], []
        now_ts = time.time()
        top = min(self.config.max_candidates, 512)
        for i in range(self.config.profile_batches):
            k = 1 + i % 4  # requests per batch
            picks = [by_length[int(q * (len(users) - 1))] for q in rng.random(k)]
            requests = []
            for j, user in enumerate(picks):
                n = int(np.clip(rng.geometric(1 / max(top / 4, 1)), 1, top))
                cands = rng.choice(item_ids, size=min(n, item_ids.size), replace=False).tolist()
                now = time.monotonic() * 1000.0
                requests.append(self.make_request(f"profile-{i}-{j}", int(user), cands, now + 1e9, now, now_ts))
            if i % 2 == 0:  # every other batch runs uncached users
                self.cache.clear()
            for r in requests:
                r.cached = self.cache.contains(r.payload.key, time.monotonic())
            items = tuple(_whole(r) for r in requests)
            shape = batch_shape(items)
            took = self.run_batch(Batch(items, shape, 0.0))
            if i >= 2:  # the first batches pay one-off costs (allocator, lazy init)
                shapes.append(shape)
                times.append(max(took, 1e-3))
        self.cache.clear()
        self._recent.clear()  # the sweep's users are not traffic
        self.profile_samples = (shapes, times)  # what the model was fitted on (benches score others with it)
        self.latency = LatencyModel.fit(shapes, times)
        self.scheduler.model = self.latency
        self.fit_report = self.latency.report
        self.stats = CoreStats()
        self.cache.stats = CacheStats()  # the sweep is not traffic (the cache is empty again)
        logger.info("latency model fitted on %d batches: %s", len(shapes), self.fit_report.as_dict())
        return self.fit_report


def _whole(request: Pending) -> BatchItem:
    return BatchItem(request, 0, request.candidates)
