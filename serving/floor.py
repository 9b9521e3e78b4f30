"""Serve's own floor: the ranking API's HTTP path with nothing behind it.

The serving bench deploys this app in place of the ranking service and fires the same light
schedule at it, so the latency it measures is what Ray Serve itself costs on this machine —
the HTTP proxy, one ingress replica, a JSON body read and parsed, a response of the same shape
and size (constant scores, one per candidate) — and the service's overhead can be read against
it (``serve_overhead_over_floor_p50_ms``) instead of against zero.

It deliberately skips everything that is the service's own work: validation beyond JSON
decoding, the API key, the hop to a ranker replica, the scheduler, the model.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself (see serving/ingress.py).
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

floor_app = FastAPI(title="ultrarank floor", description="Constant scores on the ranking API's HTTP path.")
FLOOR_SCORE = 0.5


def floor_response(body: dict, replica: str) -> dict:
    """The ranking response's shape for ``body``'s candidates, every score ``FLOOR_SCORE``."""
    candidates = body.get("candidates") or []
    return {
        "request_id": body.get("request_id") or "",
        "user_id": body.get("user_id"),
        "scores": [{"item_id": item, "engage": FLOOR_SCORE, "like": FLOOR_SCORE} for item in candidates],
        "degraded": False,
        "unscored": [],
        "cache_hit": False,
        "replica": replica,
        "queue_ms": 0.0,
        "compute_ms": 0.0,
        "model_version": "floor",
        "sequence_version": 0,
    }


@serve.deployment(name="Floor")  # the ingress's options: same actor shape
@serve.ingress(floor_app)
class Floor:
    def __init__(self) -> None:
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve
            self.replica = "local"

    @floor_app.post("/rank")
    async def rank(self, request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "invalid_json"}, status_code=422)
        if not isinstance(body, dict):
            return JSONResponse({"error": "invalid_request"}, status_code=422)
        return JSONResponse(floor_response(body, self.replica))

    @floor_app.get("/readyz")
    async def readyz(self) -> dict:
        return {"ready": True, "replica": self.replica, "model_version": "floor"}


def floor_application(max_ongoing_requests: int = 256):
    """The bound floor app (one replica, as the ranking app's ingress)."""
    return Floor.options(max_ongoing_requests=max_ongoing_requests).bind()
