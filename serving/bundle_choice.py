"""Which weights a ranker replica serves: fp32, the bundle's W8A16, or the faster of the two on
the CPU at hand (``serve.w8a16: auto``).

Whether int8 weights pay depends on the CPU and on the call shapes, not on an instruction set
alone: on an AVX2 machine without native bf16 the W8A16 layers dequantise small calls, and the
models bench measured them 1.2-1.5x slower than fp32 at one request, while at 256 groups they
were at par and the MoE layers 2x faster. So ``auto`` measures: the same single-request batches
(cache misses, the serving path's dearest case) scored by both models, alternately, several
rounds; the faster median wins. A bundle exported without W8A16 weights is served in fp32.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from components.bundle import Bundle, load_bundle
from serving.config import ServeConfig
from serving.sequence_store import SequenceStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsChoice:
    """What a replica serves and why (in its snapshot and its start log)."""

    policy: str  # "auto", "on" or "off" (serve.w8a16)
    quantized: bool
    float_ms: float | None = None  # median of the timed requests, when measured
    w8a16_ms: float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


Timer = Callable[[list[Bundle], SequenceStore, ServeConfig], list[float]]


def time_bundles(bundles: list[Bundle], store: SequenceStore, config: ServeConfig, requests: int = 6) -> list[float]:
    """Median ms per bundle of the same one-request batches (cache misses; users of the store
    spread over history lengths, 18 candidates: the load test's median), timed alternately in
    rounds so that drift on a shared machine falls on both."""
    from serving.ranker_core import RankerCore

    rng = np.random.default_rng(0)
    lengths = np.diff(store.offsets)
    users = store.user_ids[np.argsort(lengths)]
    picks = [int(users[int(q * (len(users) - 1))]) for q in np.linspace(0.2, 1.0, requests)]
    item_ids = bundles[0].items["item_id"].to_numpy()
    candidates = [rng.choice(item_ids, size=min(18, item_ids.size), replace=False).tolist() for _ in picks]
    cores = [RankerCore(bundle, store, config) for bundle in bundles]
    times: list[list[float]] = [[] for _ in cores]
    now_ts = time.time()
    for round_ in range(3):
        for user, cands in zip(picks, candidates):
            for i, core in enumerate(cores):
                core.cache.clear()
                started = time.perf_counter()
                core.score_now(user, cands, now_ts)
                if round_:  # the first round pays one-off costs (allocator, lazy init)
                    times[i].append((time.perf_counter() - started) * 1000.0)
    return [float(np.median(t)) for t in times]


def load_served_bundle(
    path: str,
    store: SequenceStore,
    config: ServeConfig,
    storage_options: dict | None = None,
    timer: Timer = time_bundles,
) -> tuple[Bundle, WeightsChoice]:
    """The bundle a replica serves under ``config.w8a16`` (true, false or "auto"), and the choice."""
    options = {"storage_options": storage_options, "cache_dir": config.bundle_cache}
    if config.w8a16 != "auto":
        chosen = WeightsChoice("on" if config.w8a16 else "off", bool(config.w8a16))
        return load_bundle(path, w8a16=chosen.quantized, **options), chosen
    fp32 = load_bundle(path, w8a16=False, **options)
    if not fp32.manifest.w8a16:
        return fp32, WeightsChoice("auto", False)
    int8 = load_bundle(path, w8a16=True, **options)
    float_ms, w8a16_ms = timer([fp32, int8], store, config)
    choice = WeightsChoice("auto", w8a16_ms < float_ms, round(float_ms, 3), round(w8a16_ms, 3))
    logger.info(
        "serve.w8a16=auto: fp32 %.2f ms, W8A16 %.2f ms per request on this CPU: serving %s",
        float_ms,
        w8a16_ms,
        "W8A16" if choice.quantized else "fp32",
    )
    return (int8 if choice.quantized else fp32), choice
