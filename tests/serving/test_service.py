"""The ranking service on real Serve over real HTTP: scores, cache hits, affinity, the bad-input
matrix, unknown ids, health and metrics."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from components.config_loader import load_config
from pipelines.config import PipelineConfig
from serving.api import routing_header, routing_headers
from serving.floor import floor_response
from serving.sequence_store import SequenceStore
from tests.serving.live_service import REQUEST_TS, deployed, metric_sum
from tests.small_runs import lake_args

API_KEY = "test-key-0123"


@pytest.fixture(scope="module")
def service(ray_session, small_lake, bundle_dir):
    import os

    os.environ["ULTRARANK_TEST_API_KEY"] = API_KEY
    overrides = (
        "--serve.num_replicas=2",
        "--serve.max_candidates=40",
        "--serve.max_body_bytes=65536",
        "--serve.api_key_env=ULTRARANK_TEST_API_KEY",
    )
    with deployed(small_lake, bundle_dir, *overrides, headers={"x-api-key": API_KEY}) as client:
        yield client


@pytest.fixture(scope="module")
def users(small_lake) -> list[int]:
    store = SequenceStore.load(small_lake)
    return [int(u) for u in store.user_ids]


@pytest.fixture(scope="module")
def items(bundle_dir) -> list[int]:
    from components.bundle import load_bundle

    return load_bundle(bundle_dir).items["item_id"].to_pylist()


def rank(client: httpx.Client, headers: dict | None = None, **body) -> httpx.Response:
    """POST /rank as the API asks of clients: the user in the routing header too (``headers``
    replace it)."""
    body.setdefault("request_ts", REQUEST_TS)
    body.setdefault("slo_class", "loose")
    return client.post("/rank", json=body, headers=routing_headers(body["user_id"]) if headers is None else headers)


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
    # Serve's floor (the serving bench's reference) answers in the same shape.
    assert set(floor_response({"candidates": cands}, "floor")) == set(body)
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
    """By the routing header, in Serve's proxy: no request is forwarded between replicas."""
    time.sleep(2.5)  # every replica's counters reach the hub (pushed each second)
    forwarded = metric_sum(service.get("/metrics").text, "ultrarank_forwarded_total")
    seen: dict[int, set[str]] = {}
    for user in users[:16]:
        for k in range(2):
            response = rank(service, user_id=user, candidates=items[k : k + 3])
            assert response.status_code == 200, response.text
            seen.setdefault(user, set()).add(response.json()["replica"])
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    assert len(set().union(*seen.values())) == 2
    time.sleep(2.5)
    assert metric_sum(service.get("/metrics").text, "ultrarank_forwarded_total") == forwarded


def test_a_missing_or_forged_routing_key_is_forwarded_to_the_bodys_user_and_never_fails(service, users, items):
    """The proxy routes by the header alone; the replica that gets a request whose key does not
    name the body's user forwards it, so it is scored where the body's user is cached."""

    def forwarded() -> float:
        return metric_sum(service.get("/metrics").text, "ultrarank_forwarded_total")

    # Two users the keyed route sends to different replicas: a forged key then points elsewhere.
    home = {u: rank(service, user_id=u, candidates=items[:2]).json()["replica"] for u in users[:12]}
    a = users[0]
    b = next(u for u in users[:12] if home[u] != home[a])
    before = forwarded()
    header = routing_header()
    for headers in ({}, {header: str(b)}, {header: "not-a-user"}, {header: "0" + str(a)}):
        for _ in range(2):
            response = rank(service, headers=headers, user_id=a, candidates=items[:2])
            assert response.status_code == 200, (headers, response.text)
            assert response.json()["replica"] == home[a], headers
            assert response.json()["cache_hit"], headers  # the state the keyed requests cached
    # The metrics of the other replica reach the hub within a second or so.
    deadline = time.time() + 30
    while forwarded() - before < 8 and time.time() < deadline:
        time.sleep(0.5)
    assert forwarded() - before == 8


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


@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "in_a_field"])
def test_deeply_nested_json_is_422_invalid_json_before_decoding(service, users, items, wrap):
    """30,000 levels (the test service takes 64 KB bodies; tests/serving/test_parts.py sends
    100,000 to the parser): Python's decoder recursed past its limit here and the answer was 503."""
    nested = "[" * 30_000 + "1" + "]" * 30_000
    body = '{"user_id": 1, "candidates": ' + nested + "}" if wrap else nested
    response = service.post("/rank", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_json"
    depth = 30_001 if wrap else 30_000
    assert response.json()["detail"] == [
        {"field": "body", "message": f"JSON nested {depth} deep; at most 32 levels are accepted"}
    ]
    assert rank(service, user_id=users[0], candidates=items[:2]).status_code == 200  # and it goes on


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


def _serve_processes() -> list:
    """The HTTP proxy's and the ranker replicas' processes (where a request body is read):
    workers of the Ray this test process started, by their process titles."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::ProxyActor") or (title.startswith("ray::ServeReplica") and ":Ranker" in title):
            found.append(process)
    return found


@pytest.mark.parametrize("chunked", [False, True])
def test_a_100_mb_body_is_refused_without_the_server_holding_it(service, users, items, chunked):
    import threading

    processes = _serve_processes()
    assert processes, "no proxy or ranker process found"
    base = sum(p.memory_info().rss for p in processes)
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(sum(p.memory_info().rss for p in processes))
            time.sleep(0.01)

    chunk = b"1," * 500_000  # 1 MB
    total = 100 * len(chunk)

    def body():
        yield b'{"user_id": 1, "candidates": ['
        for _ in range(100):
            yield chunk

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        headers = {} if chunked else {"content-length": str(len(b'{"user_id": 1, "candidates": [') + total)}
        response = service.post("/rank", content=body(), headers=headers)
        status = response.status_code
    except httpx.HTTPError:  # the server may close the connection before the upload ends
        status = 413
    finally:
        done.set()
        sampler.join()
    assert status == 413
    grew = max(peak) - base
    assert grew < 32 << 20, f"the proxy and rankers grew by {grew >> 20} MiB for a 100 MB body"
    assert rank(service, user_id=users[1], candidates=items[:2]).status_code == 200


def test_unknown_user_and_items_are_scored_through_oov_and_counted(service, items):
    response = rank(service, user_id=987654321987, candidates=[items[0], 10**15])
    assert response.status_code == 200
    assert len(response.json()["scores"]) == 2
    deadline = time.time() + 60
    while time.time() < deadline:  # replicas report their counters every ~second
        text = service.get("/metrics").text
        if "ultrarank_unknown_items_total" in text and metric_sum(text, "ultrarank_unknown_items_total") >= 1:
            break
        time.sleep(0.5)
    assert (
        metric_sum(text, "ultrarank_unknown_items_total") >= 1
        and metric_sum(text, "ultrarank_unknown_users_total") >= 1
    )


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


def test_rank_needs_the_api_key_when_one_is_configured(service, users, items):
    # The loose class: the normal one (150 ms) is rejected as unattainable on a loaded machine.
    body = {"user_id": users[0], "candidates": items[:2], "slo_class": "loose", "request_ts": REQUEST_TS}
    assert service.post("/rank", json=body, headers={"x-api-key": ""}).status_code == 401
    assert service.post("/rank", json=body, headers={"x-api-key": API_KEY + "x"}).status_code == 401
    response = service.post("/rank", json=body)
    assert response.status_code == 200, response.text
    assert service.get("/healthz", headers={"x-api-key": ""}).status_code == 200  # probes stay open


def test_a_storm_of_disconnecting_clients_leaks_no_queue_slot(service, users, items):
    import asyncio

    async def storm() -> int:
        async with httpx.AsyncClient(base_url=str(service.base_url), headers={"x-api-key": API_KEY}) as client:

            async def one(i: int) -> bool:
                body = {"user_id": users[i % len(users)], "candidates": items[:30], "slo_class": "loose"}
                try:
                    await client.post("/rank", json={**body, "request_ts": REQUEST_TS + 60 * i}, timeout=0.02)
                except httpx.TimeoutException:
                    return True
                return False

            return sum(await asyncio.gather(*(one(i) for i in range(40))))

    gave_up = asyncio.run(storm())
    assert gave_up > 0
    deadline = time.time() + 120
    while time.time() < deadline:
        text = service.get("/metrics").text
        if metric_sum(text, "ultrarank_queue_length") == 0:
            break
        time.sleep(0.5)
    assert metric_sum(text, "ultrarank_queue_length") == 0
    assert rank(service, user_id=users[0], candidates=items[:3]).status_code == 200


def test_a_killed_ranker_replica_costs_a_bounded_burst_and_comes_back(service, users, items):
    import os
    import signal
    import threading

    ready = service.get("/readyz").json()
    victim_pid, victim = ready["pid"], ready["replica"]
    mine = [u for u in users if rank(service, user_id=u, candidates=items[:2]).json()["replica"] == victim][:4]
    assert mine, "no user routed to the replica that answered /readyz"
    outcomes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=service.base_url, timeout=30.0, headers={"x-api-key": API_KEY}) as client:
            while not stop.is_set():
                outcomes.append(rank(client, user_id=mine[len(outcomes) % len(mine)], candidates=items[:4]).status_code)
                time.sleep(0.02)

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(1.0)
    os.kill(victim_pid, signal.SIGKILL)
    deadline = time.time() + 300
    recovered = False
    while time.time() < deadline:
        time.sleep(1.0)
        if outcomes[-5:] == [200] * 5 and len(outcomes) > 60:
            recovered = True
            break
    stop.set()
    thread.join()
    assert recovered, outcomes[-20:]
    errors = sum(code != 200 for code in outcomes)
    assert errors <= 20, f"{errors} errors of {len(outcomes)}"
    # The replacement's cache starts empty and refills: a miss, then a hit for the same user.
    user = mine[0]
    fresh = [rank(service, user_id=user, candidates=items[5:8], request_ts=REQUEST_TS + 3600).json() for _ in range(2)]
    assert [r["cache_hit"] for r in fresh] == [False, True] and fresh[0]["replica"] == fresh[1]["replica"]


def test_open_loop_load_test_writes_records_summary_and_plots(service, small_lake, bundle_dir, tmp_path):
    from pipelines.loadtest import run_loadtest

    args = [*lake_args(small_lake), f"--serve.bundle={bundle_dir}", "--serve.api_key_env=ULTRARANK_TEST_API_KEY"]
    args += ["--loadtest.duration_s=3", "--loadtest.max_candidates=30", "--loadtest.candidates_min=5"]
    config = load_config(PipelineConfig, "demo", args)
    summary = run_loadtest(config, str(service.base_url).rstrip("/"), tmp_path, [4.0, 8.0])
    assert set(summary["runs"]) == {"4", "8"} and set(summary["plots"]) == {
        "goodput_vs_load.png",
        "attainment_vs_load.png",
        "latency_cdf.png",
    }
    for tag, run in summary["runs"].items():
        scheduled = (tmp_path / f"schedule_{tag}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in (tmp_path / f"requests_{tag}.jsonl").read_text().splitlines()]
        assert len(records) == len(scheduled) == run["offered"] > 0
        assert run["errors"] == 0 and 0 <= run["attainment"] <= 1 and "lag_p99_ms" in run
        good = sum(r["good"] for r in records)
        assert run["goodput_per_s"] == pytest.approx(good / 3.0)
    assert (
        json.loads((tmp_path / "summary.json").read_text())["runs"]["4"]["offered"] == summary["runs"]["4"]["offered"]
    )
