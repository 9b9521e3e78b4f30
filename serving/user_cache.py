"""The per-replica user-side cache: ``encode_user`` outputs by (user, model version, sequence version).

LRU with a byte budget and a TTL. A key names everything the state depends on, so a hit is
the very state a miss would compute (the exactness tests compare scores): a new model or a
new ``sequences`` version simply stops matching old keys, and ``retain`` drops those at once
to free their bytes. Not thread-safe by itself: the replica touches it from its one compute
thread.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class CacheKey(NamedTuple):
    user_id: int
    model_version: str
    sequence_version: int
    # The request time, quantised by the replica (``serve.request_ts_granularity_s``): the state
    # depends on it (which events precede it, their gap buckets), so hit and miss use the same.
    request_ts: int


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0  # dropped for the byte budget
    expirations: int = 0  # dropped for age
    invalidations: int = 0  # dropped for an old model or sequence version
    bytes: int = 0
    entries: int = 0


@dataclass
class _Entry:
    value: Any
    nbytes: int
    stored_at: float


@dataclass
class UserSideCache:
    """``get``/``put`` by key; ``now`` in seconds on the caller's clock."""

    max_bytes: int
    ttl_s: float
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.ttl_s <= 0:
            raise ValueError(f"cache: max_bytes must be >= 0 and ttl_s > 0, got {self.max_bytes}, {self.ttl_s}")
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()

    def contains(self, key: CacheKey, now: float) -> bool:
        """Whether ``get`` would hit (no counters, no LRU touch): the scheduler prices with it."""
        entry = self._entries.get(key)
        return entry is not None and now - entry.stored_at <= self.ttl_s

    def get(self, key: CacheKey, now: float) -> Any | None:
        entry = self._entries.get(key)
        if entry is not None and now - entry.stored_at > self.ttl_s:
            self._drop(key)
            self.stats.expirations += 1
            entry = None
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry.value

    def put(self, key: CacheKey, value: Any, nbytes: int, now: float) -> None:
        if nbytes > self.max_bytes:
            return  # bigger than the whole budget: never cached
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(value, nbytes, now)
        self.stats.bytes += nbytes
        while self.stats.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)

    def retain(self, model_version: str, sequence_version: int) -> int:
        """Drop every entry of another model or sequence version; returns how many."""
        stale = [k for k in self._entries if k.model_version != model_version or k.sequence_version != sequence_version]
        for key in stale:
            self._drop(key)
        self.stats.invalidations += len(stale)
        return len(stale)

    def clear(self) -> None:
        """Drop everything (not counted as evictions)."""
        self._entries.clear()
        self.stats.bytes = self.stats.entries = 0

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key)
        self.stats.bytes -= entry.nbytes
        self.stats.entries = len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
