"""Serve's floor (serving/floor.py) on real Serve over HTTP: the ranking API's path and
response shape with constant scores, what the serving bench measures Serve's own cost with."""

from __future__ import annotations

import httpx

from serving.floor import FLOOR_SCORE, floor_application
from tests.serving.live_service import free_port


def test_the_floor_answers_a_rank_request_with_one_constant_score_per_candidate(ray_session):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(floor_application(), name="floor", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
            assert client.get("/readyz").json()["model_version"] == "floor"
            candidates = [5, 3, 11]
            response = client.post("/rank", json={"user_id": 7, "candidates": candidates, "request_id": "r1"})
            assert response.status_code == 200, response.text
            body = response.json()
            assert [s["item_id"] for s in body["scores"]] == candidates
            assert all(s["engage"] == s["like"] == FLOOR_SCORE for s in body["scores"])
            assert (body["request_id"], body["user_id"], body["unscored"]) == ("r1", 7, [])
            assert client.post("/rank", content=b"{not json").status_code == 422
    finally:
        serve.shutdown()
