"""User-affinity routing: a user's requests reach the replica that holds its cached user side.

A Ray Serve ``RequestRouter`` (alpha API; SERVING.md: not model multiplexing, which splits
batches per id). It routes two kinds of call to the ranker replicas:

- an HTTP request, in Serve's proxy: the proxy never reads the body, so the user comes from the
  routing header (``X-Session-Id: <user_id>``, serving/api.py ``routing_header``), which the
  proxy puts in the request's metadata as Serve's session id. A request without it, or with a
  key that is not an integer, is routed by load; the replica then sees that the key does not
  name the body's user and forwards the request (below);
- a forwarded ``rank.remote(request_dict)``: the user is the dict's ``user_id``, whatever the
  header said, so a forged key costs one hop, never a wrong replica or a 5xx.

Replicas are ranked for a user by rendezvous hashing (highest random weight of ``(user_id,
replica id)``): every router instance (one per proxy and per ranker replica) agrees without
talking, and adding or removing a replica moves only ~1/n of the users. Bounded load: a
replica holding more than ``bounded_load`` x the mean ongoing requests (+1) is moved to the
back, so a hot user or a slow replica spills over instead of queueing (Mirrokni et al.,
consistent hashing with bounded loads). The ranks are returned in order, so Serve itself
falls through to the next replica when one rejects.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def rendezvous_weight(user_id: int, replica: str) -> int:
    """Stable across processes and runs (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(f"{user_id}:{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_replicas(user_id: int, replicas: list[str], loads: dict[str, int], bounded_load: float) -> list[str]:
    """Replica ids in preference order for ``user_id`` (pure: tested without Serve)."""
    ranked = sorted(replicas, key=lambda r: rendezvous_weight(user_id, r), reverse=True)
    if not ranked:
        return []
    cap = bounded_load * sum(loads.get(r, 0) for r in ranked) / len(ranked) + 1
    return [r for r in ranked if loads.get(r, 0) <= cap] + [r for r in ranked if loads.get(r, 0) > cap]


def user_of(pending: PendingRequest | None) -> int | None:
    """The user a call is routed by: a forwarded ``rank.remote(request_dict)``'s ``user_id``, else
    the routing key of an HTTP request (Serve's session id, from the routing header); None when
    neither names an integer user."""
    if pending is None:
        return None
    first: Any = pending.args[0] if pending.args else None
    if isinstance(first, dict):
        user = first.get("user_id")
        return user if isinstance(user, int) else None
    return routing_user(getattr(pending.metadata, "session_id", ""))


def routing_user(key: str | None) -> int | None:
    """The user id a routing key names: a decimal int64, else None (missing or malformed keys
    fall back to routing by load, then forwarding by the body's user)."""
    if not key or len(key) > 20:
        return None
    try:
        user = int(key, 10)
    except ValueError:
        return None
    return user if -(2**63) <= user < 2**63 and str(user) == key else None


class UserAffinityRouter(RequestRouter):
    """``request_router_config=RequestRouterConfig(request_router_class=UserAffinityRouter, ...)``."""

    def initialize_state(self, bounded_load: float = 1.5, **kwargs) -> None:
        self.bounded_load = bounded_load

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        user = user_of(pending_request)
        if user is None:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        loads = {rid: cache.get(r.replica_id) or 0 for rid, r in by_id.items()}
        order = rank_replicas(user, list(by_id), loads, getattr(self, "bounded_load", 1.5))
        return [[by_id[rid]] for rid in order]
