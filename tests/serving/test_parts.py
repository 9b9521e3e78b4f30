"""Serving parts without Serve: request validation, the user-side cache, rendezvous routing,
the sequence store."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from serving.api import MAX_JSON_DEPTH, RequestError, json_depth, parse_request
from serving.router import rank_replicas, rendezvous_weight, routing_user, user_of
from serving.sequence_store import SequenceStore
from serving.user_cache import CacheKey, UserSideCache


# ---------------------------------------------------------------- request validation
def _fields(body: dict | str, max_candidates: int = 5) -> list[str]:
    raw = body if isinstance(body, str) else json.dumps(body)
    with pytest.raises(RequestError) as info:
        parse_request(raw.encode(), max_candidates)
    assert info.value.status == 422
    return [d["field"] for d in info.value.detail]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"candidates": [1]}, "user_id"),
        ({"user_id": "7", "candidates": [1]}, "user_id"),
        ({"user_id": True, "candidates": [1]}, "user_id"),
        ({"user_id": 2**63, "candidates": [1]}, "user_id"),
        ({"user_id": 1, "candidates": []}, "candidates"),
        ({"user_id": 1, "candidates": [1, 2, 1]}, "candidates"),
        ({"user_id": 1, "candidates": [1, 2, 3, 4, 5, 6]}, "candidates"),
        ({"user_id": 1, "candidates": [1, -(2**63) - 1]}, "candidates.1"),
        ({"user_id": 1, "candidates": [1.5]}, "candidates.0"),
        ({"user_id": 1, "candidates": [1], "deadline_ms": -5}, "deadline_ms"),
        ({"user_id": 1, "candidates": [1], "deadline_ms": 1e9}, "deadline_ms"),
        ({"user_id": 1, "candidates": [1], "extra": 0}, "extra"),
        ({"user_id": 1, "candidates": [1], "allow_degraded": "yes"}, "allow_degraded"),
        ({"user_id": 1, "candidates": [1], "allow_degraded": 1}, "allow_degraded"),
        ('{"user_id": 1, "candidates": [1], "deadline_ms": NaN}', "body"),
        ('{"user_id": 1, "candidates": [Infinity]}', "body"),
        ("[1, 2]", "body"),
        ("{not json", "body"),
    ],
)
def test_malformed_request_is_422_naming_the_field(body, field):
    assert field in _fields(body)


def test_json_depth_counts_nesting_outside_strings():
    assert json_depth(b"") == 0 and json_depth(b"1") == 0
    assert json_depth(b'{"a": [1, {"b": []}]}') == 4
    assert json_depth(b'{"a": "[[[{{{", "b": "\\"[[[", "c": [[1]]}') == 3  # brackets in strings, escaped quote
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000


def test_nesting_past_the_limit_is_refused_and_at_the_limit_decoded():
    def nested(depth: int) -> bytes:  # an extra field holding ``depth`` levels in all
        return b'{"user_id": 1, "candidates": [1], "extra": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    with pytest.raises(RequestError) as deep:
        parse_request(nested(MAX_JSON_DEPTH + 1), 5)
    assert (deep.value.status, deep.value.reason) == (422, "invalid_json")
    assert deep.value.detail[0]["field"] == "body" and "33 deep" in deep.value.detail[0]["message"]
    with pytest.raises(RequestError) as decoded:  # decoded, then refused for the extra field
        parse_request(nested(MAX_JSON_DEPTH), 5)
    assert decoded.value.reason == "invalid_request" and decoded.value.detail[0]["field"] == "extra"
    with pytest.raises(RequestError) as hundred_k:  # RecursionError in the decoder before the limit
        parse_request(b"[" * 100_000 + b"]" * 100_000, 5)
    assert hundred_k.value.status == 422 and "100000 deep" in hundred_k.value.detail[0]["message"]


def test_valid_request_parses_with_defaults():
    request = parse_request(b'{"user_id": -3, "candidates": [9, 2**62], "deadline_ms": 80}'.replace(b"2**62", b"4"), 5)
    assert (request.user_id, request.candidates, request.deadline_ms, request.slo_class) == (-3, [9, 4], 80.0, None)
    assert request.allow_degraded is None  # the service's serve.scheduler.degrade decides
    assert parse_request(b'{"user_id": 1, "candidates": [1], "allow_degraded": false}', 5).allow_degraded is False


# ---------------------------------------------------------------- user-side cache
def key(user: int, model: str = "m1", seq: int = 3, ts: int = 60) -> CacheKey:
    return CacheKey(user, model, seq, ts)


def test_cache_is_lru_within_its_byte_budget():
    cache = UserSideCache(max_bytes=250, ttl_s=100)
    for user in (1, 2):
        cache.put(key(user), f"state{user}", 100, now=0.0)
    assert cache.get(key(1), now=1.0) == "state1"  # 1 is now the most recent
    cache.put(key(3), "state3", 100, now=2.0)  # over budget: evicts 2, the least recent
    assert cache.get(key(2), now=3.0) is None and cache.get(key(1), now=3.0) == "state1"
    assert (cache.stats.evictions, cache.stats.bytes, cache.stats.entries) == (1, 200, 2)
    cache.put(key(4), "huge", 1000, now=4.0)  # bigger than the budget: never cached
    assert cache.get(key(4), now=4.0) is None and cache.stats.bytes == 200


def test_cache_expires_by_ttl_and_keys_name_model_and_sequence_versions():
    cache = UserSideCache(max_bytes=10_000, ttl_s=10)
    cache.put(key(1), "s", 10, now=0.0)
    assert cache.contains(key(1), now=5.0) and not cache.contains(key(1, model="m2"), now=5.0)
    assert cache.get(key(1, seq=4), now=5.0) is None  # a new sequences version misses
    assert cache.get(key(1), now=11.0) is None and cache.stats.expirations == 1
    cache.put(key(1), "s", 10, now=20.0)
    cache.put(key(2, seq=4), "s", 10, now=20.0)
    assert cache.retain("m1", 4) == 1 and cache.stats.invalidations == 1 and len(cache) == 1
    assert (cache.stats.hits, cache.stats.misses) == (0, 2)


# ---------------------------------------------------------------- routing
def test_rendezvous_is_stable_balanced_and_moves_few_users_when_a_replica_goes():
    replicas = ["a", "b", "c"]
    first = {u: rank_replicas(u, replicas, {}, 1.5)[0] for u in range(3000)}
    assert first == {u: rank_replicas(u, list(reversed(replicas)), {}, 1.5)[0] for u in range(3000)}
    counts = np.bincount([replicas.index(r) for r in first.values()])
    assert counts.min() > 800  # ~1000 each
    after = {u: rank_replicas(u, ["a", "b"], {}, 1.5)[0] for u in range(3000)}
    moved = [u for u in first if first[u] != after[u]]
    assert all(first[u] == "c" for u in moved)  # only the users of the removed replica move
    assert rendezvous_weight(7, "a") == rendezvous_weight(7, "a")


def test_bounded_load_spills_a_hot_replica_to_the_back():
    order = rank_replicas(42, ["a", "b", "c"], {}, 1.5)
    loads = {order[0]: 30, order[1]: 0, order[2]: 0}  # mean 10: cap 16
    spilled = rank_replicas(42, ["a", "b", "c"], loads, 1.5)
    assert spilled == [order[1], order[2], order[0]]
    assert rank_replicas(42, ["a", "b", "c"], {order[0]: 2}, 1.5) == order  # mean 2/3: cap 2, stays


def _pending(args: list, session_id: str = ""):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    metadata = RequestMetadata(request_id="r", internal_request_id="i", session_id=session_id)
    return PendingRequest(args=args, kwargs={}, metadata=metadata, future=None)


def test_the_router_reads_the_forwarded_body_first_then_the_proxys_routing_key():
    # An HTTP request in the proxy: the body is an opaque serialized argument, the key is the
    # header the proxy put in the metadata as Serve's session id.
    assert user_of(_pending([b"opaque"], session_id="42")) == 42
    assert user_of(_pending([b"opaque"], session_id="-7")) == -7
    # A forwarded call routes by the dict's user even when the header it came with was forged.
    assert user_of(_pending([{"user_id": 5, "candidates": [1]}], session_id="42")) == 5
    assert user_of(_pending([{"user_id": "5"}], session_id="42")) is None
    # No key, or one that is not a canonical int64: routed by load (then forwarded by the body).
    for key in ("", "abc", "4.2", " 42", "042", "+42", str(2**63), "1" * 30, "٤٢"):
        assert routing_user(key) is None, key
        assert user_of(_pending([b"opaque"], session_id=key)) is None, key
    assert user_of(_pending([])) is None and user_of(None) is None
    assert routing_user(str(-(2**63))) == -(2**63)


def test_the_routing_header_is_the_one_serves_proxy_reads(monkeypatch):
    from serving.api import SESSION_HEADER_ENV, routing_header, routing_headers

    monkeypatch.delenv(SESSION_HEADER_ENV, raising=False)
    assert routing_headers(12) == {"x-session-id": "12"}
    monkeypatch.setenv(SESSION_HEADER_ENV, "X-User-Id")
    assert routing_header() == "x-user-id"


# ---------------------------------------------------------------- sequence store
def test_history_is_the_last_events_before_the_request_time():
    table = pa.table(
        {
            "user_id": pa.array([9, 4], pa.int64()),
            "item_idx": pa.array([[5, 6, 7, 8], [2]], pa.list_(pa.int32())),
            "action": pa.array([[1, 2, 3, 4], [1]], pa.list_(pa.int8())),
            "ts": pa.array([[10, 20, 30, 40], [15]], pa.list_(pa.int64())),
        }
    )
    store = SequenceStore.from_table(table, version=3)
    h = store.history(9, before_ts=40, max_len=2)
    assert h.item_idx.tolist() == [6, 7] and h.action.tolist() == [2, 3] and h.ts.tolist() == [20, 30]
    assert store.history(9, before_ts=11, max_len=5).item_idx.tolist() == [5]
    assert len(store.history(9, before_ts=10, max_len=5)) == 0
    assert store.history(4, before_ts=100, max_len=5).item_idx.tolist() == [2]
    assert len(store.history(5, before_ts=100, max_len=5)) == 0 and not store.knows(5) and store.knows(4)


# ---------------------------------------------------------------- the Serve CLI's builder
def test_serve_cli_builder_resolves_the_presets_bundle_lake_and_overrides(tmp_path):
    from components.config_loader import ConfigError
    from serving.app import resolve

    config, bundle, root, options = resolve({"config": "demo", "serve.num_replicas": "2"})
    assert config.num_replicas == 2
    assert bundle.endswith("bundles/full") and root.endswith("/lake") and options == {}
    config, bundle, _, _ = resolve({"bundle": str(tmp_path), "train.run_name": "mine"})
    assert bundle == str(tmp_path)
    assert resolve({"train.run_name": "mine"})[1].endswith("bundles/mine")
    with pytest.raises(ConfigError, match="num_replicas"):
        resolve({"serve.num_replicas": "0"})


def test_the_proxy_body_ceiling_is_read_from_the_environment_and_checked(monkeypatch):
    from components.config_loader import ConfigError, load_config
    from pipelines.config import PipelineConfig
    from pipelines.serve import start
    from serving import proxy_limits

    monkeypatch.setenv(proxy_limits.CEILING_ENV, "lots")
    with pytest.raises(ValueError, match=proxy_limits.CEILING_ENV):
        proxy_limits.ceiling()
    monkeypatch.setenv(proxy_limits.CEILING_ENV, str(1 << 20))
    monkeypatch.setenv(proxy_limits.CALLBACK_ENV, proxy_limits.CALLBACK)
    assert proxy_limits.proxy_environment()[proxy_limits.CEILING_ENV] == str(1 << 20)
    # and Serve's proxies get a minute to answer their ready and health checks (a loaded machine)
    assert proxy_limits.proxy_environment()["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "60"
    config = load_config(PipelineConfig, "demo", ["--serve.max_body_bytes=2000000"])
    with pytest.raises(ConfigError, match="max_body_bytes=2000000 exceeds the proxy's body ceiling"):
        start(config)  # refused before anything is deployed
