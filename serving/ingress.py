"""The HTTP front of the ranking service: a FastAPI ingress that validates and sizes requests
(serving/api.py), resolves the SLO class to a deadline and forwards to the ranker deployment,
whose handle routes by user (serving/router.py).

Routes: ``POST /rank`` (SERVING.md), ``GET /healthz`` (the ingress is up), ``GET /readyz``
(a ranker replica answers, with its model version), ``GET /metrics`` (Prometheus text),
``GET /docs`` (OpenAPI). Errors: 413, 422 naming the field, 401 without the API key when one
is configured, 429/503 with ``reason`` and Retry-After.

Every ingress replica imports this module and only what it needs: no torch, no model code (the
ranker replicas hold those). Importing them here cost each ingress replica ~4.5 s of CPU at start.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself in the class-based
# routes, or it takes the parameter for a query field.
import asyncio
import hmac
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect

from components.config_loader import from_dict
from serving.api import RankRequest, RequestError, parse_request, read_body
from serving.config import ServeConfig
from serving.metrics import HttpCounters, render

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="ultrarank",
    description="Ranks candidate items for a user: long-sequence ranker, user-side cache, SLO-aware batching.",
)


def _error_response(error: RequestError, counters: HttpCounters) -> JSONResponse:
    counters.count(error.status, error.reason)
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, ranker: DeploymentHandle, metrics: DeploymentHandle, config: dict, api_key: str = "") -> None:
        self.config = from_dict(ServeConfig, config, "serve")
        self.ranker = ranker
        self.metrics = metrics
        self.counters = HttpCounters()
        self.api_key = api_key

    @app.post(
        "/rank",
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": RankRequest.model_json_schema()}}}},
    )
    async def rank(self, request: Request) -> JSONResponse:
        """Scores per candidate and task, with cache_hit, replica, queue_ms, compute_ms, model_version."""
        received = time.time()
        try:
            self._authorize(request)
            body = await read_body(request.stream(), request.headers.get("content-length"), self.config.max_body_bytes)
            parsed = parse_request(body, self.config.max_candidates)
            payload = self._payload(parsed, received)
            result = await self.ranker.rank.remote(payload)
        except RequestError as error:
            return _error_response(error, self.counters)
        except ClientDisconnect:  # the client went away mid-body: nobody to answer, nothing broken
            return _error_response(RequestError(499, "client_disconnected"), self.counters)
        except Exception as exc:  # noqa: BLE001 - Serve's own backpressure and replica loss
            from ray.serve.exceptions import BackPressureError

            if isinstance(exc, BackPressureError):
                return _error_response(RequestError(429, "overloaded", retry_after_s=1.0), self.counters)
            logger.exception("rank failed")
            return _error_response(RequestError(503, "unavailable", retry_after_s=1.0), self.counters)
        status = result.pop("status")
        if status != 200:
            error = RequestError(status, result["reason"], {"replica": result["replica"]}, result["retry_after_s"])
            return _error_response(error, self.counters)
        self.counters.count(200)
        return JSONResponse(result)

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise RequestError(401, "unauthorized")

    def _payload(self, parsed: RankRequest, received: float) -> dict[str, Any]:
        classes = self.config.slo_classes
        slo_class = parsed.slo_class or self.config.default_slo_class
        if slo_class not in classes:
            detail = [{"field": "slo_class", "message": f"{slo_class!r} is not one of {sorted(classes)}"}]
            raise RequestError(422, "invalid_request", detail)
        return {
            "request_id": parsed.request_id or uuid.uuid4().hex,
            "user_id": parsed.user_id,
            "candidates": parsed.candidates,
            "slo_class": slo_class,
            "deadline_ms": parsed.deadline_ms or classes[slo_class],
            "received_s": received,
            "request_ts": parsed.request_ts,
            "allow_degraded": parsed.allow_degraded,
        }

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.ranker.ready.remote(), timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - not ready, whatever the cause
            return JSONResponse({"ready": False, "error": type(exc).__name__}, status_code=503)
        return JSONResponse({"ready": True, **info})

    @app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        snapshots = await self.metrics.snapshots.remote()
        return PlainTextResponse(render(self.counters, snapshots), media_type="text/plain; version=0.0.4")
