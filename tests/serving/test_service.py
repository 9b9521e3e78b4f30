"""The ranking service on real Serve over real HTTP: scores, cache hits, affinity, the bad-input
matrix, unknown ids, health and metrics."""

from __future__ import annotations

import json
import socket
import time

import httpx
import numpy as np
import pytest

from components.config_loader import load_config
from pipelines.config import PipelineConfig
from serving.sequence_store import SequenceStore
from tests.small_runs import lake_args

REQUEST_TS = 1_900_000_000  # after every event of the small lake: the whole history counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_session, small_lake, bundle_dir):
    from ray import serve

    from pipelines.serve import start

    args = [
        *lake_args(small_lake),
        f"--serve.bundle={bundle_dir}",
        f"--serve.port={_free_port()}",
        "--serve.num_replicas=2",
        "--serve.replica_cpus=0.25",
        "--serve.profile_batches=8",
        "--serve.max_candidates=40",
        "--serve.max_body_bytes=65536",
    ]
    config = load_config(PipelineConfig, "demo", args)
    url = start(config)
    with httpx.Client(base_url=url, timeout=30.0) as client:
        deadline = time.time() + 60
        while client.get("/readyz").status_code != 200:
            assert time.time() < deadline, "service never became ready"
            time.sleep(0.5)
        yield client
    serve.shutdown()


@pytest.fixture(scope="module")
def users(small_lake) -> list[int]:
    store = SequenceStore.load(small_lake)
    return [int(u) for u in store.user_ids]


@pytest.fixture(scope="module")
def items(bundle_dir) -> list[int]:
    from components.bundle import load_bundle

    return load_bundle(bundle_dir).items["item_id"].to_pylist()


def rank(client: httpx.Client, **body) -> httpx.Response:
    body.setdefault("request_ts", REQUEST_TS)
    body.setdefault("slo_class", "loose")
    return client.post("/rank", json=body)


def test_rank_returns_scores_equal_to_the_model_and_a_hit_equals_the_miss(
    service, users, items, bundle_dir, small_lake
):
    from components.bundle import load_bundle
    from serving.config import ServeConfig
    from serving.ranker_core import RankerCore

    user, cands = users[3], items[:6]
    first = rank(service, user_id=user, candidates=cands)
    assert first.status_code == 200, first.text
    body = first.json()
    assert [s["item_id"] for s in body["scores"]] == cands and not body["cache_hit"]
    assert {"replica", "queue_ms", "compute_ms", "model_version"} <= set(body)
    second = rank(service, user_id=user, candidates=cands).json()
    assert second["cache_hit"] and second["replica"] == body["replica"]
    got = np.array([[s["engage"], s["like"]] for s in body["scores"]])
    again = np.array([[s["engage"], s["like"]] for s in second["scores"]])
    np.testing.assert_allclose(again, got, rtol=0, atol=1e-5)
    # The same request scored offline, in this process: the bundle's model, no Serve, no cache.
    core = RankerCore(load_bundle(bundle_dir), SequenceStore.load(small_lake), ServeConfig())
    offline, _ = core.score_now(user, cands, REQUEST_TS)
    np.testing.assert_allclose(got, offline, rtol=0, atol=1e-5)
    assert body["model_version"] == core.bundle.model_version


def test_a_users_requests_reach_one_replica_and_users_spread_over_both(service, users, items):
    seen: dict[int, set[str]] = {}
    for user in users[:16]:
        for k in range(2):
            response = rank(service, user_id=user, candidates=items[k : k + 3])
            assert response.status_code == 200, response.text
            seen.setdefault(user, set()).add(response.json()["replica"])
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    assert len(set().union(*seen.values())) == 2


BAD_BODIES = [
    ('{"user_id": 1, "candidates": [1, 1]}', "candidates"),
    ('{"user_id": 1, "candidates": [1], "deadline_ms": NaN}', "body"),
    ('{"user_id": 1e400, "candidates": [1]}', "body"),
    ('{"user_id": 99999999999999999999, "candidates": [1]}', "user_id"),
    ('{"user_id": 1, "candidates": [1], "surprise": true}', "surprise"),
    ('{"user_id": "1", "candidates": [1]}', "user_id"),
    ('{"user_id": 1, "candidates": "1"}', "candidates"),
    (json.dumps({"user_id": 1, "candidates": list(range(41))}), "candidates"),
    ('{"user_id": 1, "candidates": [1], "slo_class": "vip"}', "slo_class"),
    ('{"user_id": 1, "candidates": [1], "deadline_ms": 0}', "deadline_ms"),
    ("", "body"),
]


@pytest.mark.parametrize("raw, field", BAD_BODIES)
def test_bad_input_is_422_naming_the_field_and_the_service_goes_on(service, users, items, raw, field):
    replicas_before = service.get("/readyz").json()
    response = service.post("/rank", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert field in [d["field"] for d in response.json()["detail"]]
    ok = rank(service, user_id=users[0], candidates=items[:2])
    assert ok.status_code == 200
    assert service.get("/readyz").json()["model_version"] == replicas_before["model_version"]


def test_oversized_body_is_413_by_length_and_while_chunked(service, users, items):
    big = b'{"user_id": 1, "candidates": [' + b"1," * 100_000 + b"2]}"
    assert service.post("/rank", content=big).status_code == 413

    def chunks():
        yield b'{"user_id": 1, "candidates": ['
        for _ in range(50):
            yield b"1," * 1000

    response = service.post("/rank", content=chunks())  # no Content-Length: chunked
    assert response.status_code == 413 and response.json()["error"] == "body_too_large"
    assert rank(service, user_id=users[1], candidates=items[:2]).status_code == 200


def test_unknown_user_and_items_are_scored_through_oov_and_counted(service, items):
    response = rank(service, user_id=987654321987, candidates=[items[0], 10**15])
    assert response.status_code == 200
    assert len(response.json()["scores"]) == 2
    deadline = time.time() + 10
    while time.time() < deadline:  # replicas report their counters every ~second
        text = service.get("/metrics").text
        if "ultrarank_unknown_items_total" in text and _sum(text, "ultrarank_unknown_items_total") >= 1:
            break
        time.sleep(0.5)
    assert _sum(text, "ultrarank_unknown_items_total") >= 1 and _sum(text, "ultrarank_unknown_users_total") >= 1


def _sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_unattainable_deadline_is_503_with_retry_after(service, users, items):
    response = rank(service, user_id=users[2], candidates=items[:30], deadline_ms=0.001)
    assert response.status_code == 503 and response.json()["error"] == "slo_unattainable"
    assert int(response.headers["retry-after"]) >= 1


def test_health_readiness_metrics_and_docs(service):
    assert service.get("/healthz").json() == {"status": "ok"}
    assert service.get("/readyz").json()["ready"] is True
    text = service.get("/metrics").text
    assert "ultrarank_http_responses_total" in text and "ultrarank_cache_hits_total" in text
    spec = service.get("/openapi.json").json()
    assert "/rank" in spec["paths"] and "candidates" in json.dumps(spec["paths"]["/rank"])
