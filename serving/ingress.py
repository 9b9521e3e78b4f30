"""The HTTP front of the ranking service, served by the ranker replicas themselves.

Serve's proxy routes ``POST /rank`` straight to the ranker replica that holds the user's state:
the client names the user in the routing header (serving/api.py ``routing_header``), which the
proxy hands the ``UserAffinityRouter`` without reading the body. The replica validates and
sizes the request (serving/api.py), resolves the SLO class to a deadline and admits it into its
own scheduler: no ingress deployment and no second actor call in between. A request whose
routing key is missing or does not name the body's user is forwarded once to the replica the
body's user hashes to (a handle call routed by the body), so it is served by the right
replica either way, never answered 5xx for it.

Routes: ``POST /rank`` (SERVING.md), ``GET /healthz`` (a replica is up), ``GET /readyz`` (a ranker
replica answers, with its model version), ``GET /metrics`` (Prometheus text), ``GET /docs``
(OpenAPI). Errors: 413, 422 naming the field, 401 without the API key when one is configured,
429/503 with ``reason`` and Retry-After.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself in the class-based
# routes, or it takes the parameter for a query field.
import hmac
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from starlette.requests import ClientDisconnect

from serving.api import RankRequest, RequestError, parse_request, read_body, routing_header
from serving.metrics import HttpCounters, render
from serving.ranker import RankerReplica

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="ultrarank",
    description=(
        "Ranks candidate items for a user: long-sequence ranker, user-side cache, SLO-aware batching. "
        "Send the user id in the routing header (default `X-Session-Id`) too: the proxy then routes "
        "the request straight to the replica that caches the user."
    ),
)


def _error_response(error: RequestError, counters: HttpCounters) -> JSONResponse:
    counters.count(error.status, error.reason)
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@serve.ingress(app)
class RankingService(RankerReplica):
    """A ranker replica (serving/ranker.py) that also answers the HTTP routes."""

    def __init__(
        self, bundle_path: str, lake_root: str, storage_options: dict, config: dict, metrics=None, api_key: str = ""
    ) -> None:
        super().__init__(bundle_path, lake_root, storage_options, config, metrics)
        self.counters = HttpCounters()
        self.api_key = api_key
        self.header = routing_header()
        self._peers = None  # a handle to this deployment, made at the first forwarded request

    @app.post(
        "/rank",
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": RankRequest.model_json_schema()}}}},
    )
    async def rank_http(self, request: Request) -> JSONResponse:
        """Scores per candidate and task, with cache_hit, replica, queue_ms, compute_ms, model_version."""
        received = time.time()
        try:
            self._authorize(request)
            body = await read_body(request.stream(), request.headers.get("content-length"), self.config.max_body_bytes)
            parsed = parse_request(body, self.config.max_candidates)
            payload = self._payload(parsed, received)
            if request.headers.get(self.header) == str(parsed.user_id):
                result = await self.rank(payload)  # routed here by the user: serve it
            else:
                self.counters.forwarded += 1
                result = await self._forward(payload)
        except RequestError as error:
            return _error_response(error, self.counters)
        except ClientDisconnect:  # the client went away mid-body: nobody to answer, nothing broken
            return _error_response(RequestError(499, "client_disconnected"), self.counters)
        except Exception as exc:  # noqa: BLE001 - Serve's own backpressure and replica loss (forwarded)
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

    async def _forward(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` to the replica its user hashes to (maybe this one): the router reads the dict."""
        if self._peers is None:
            context = serve.get_replica_context()
            self._peers = serve.get_deployment_handle(context.deployment, context.app_name)
        return await self._peers.rank.remote(payload)

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

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "http": self.counters.as_dict()}

    def _activity(self) -> tuple:
        return (*super()._activity(), self.counters.total())

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        # Serve routes requests only to a replica whose constructor returned: the bundle is
        # loaded and the latency model fitted, so answering is being ready.
        return JSONResponse({"ready": True, **self.ready()})

    @app.get("/metrics")
    async def metrics_text(self) -> PlainTextResponse:
        snapshots = await self.metrics.snapshots.remote() if self.metrics is not None else {}
        snapshots[self.replica] = self.snapshot()  # this replica's own counters, fresh
        return PlainTextResponse(render(snapshots), media_type="text/plain; version=0.0.4")
