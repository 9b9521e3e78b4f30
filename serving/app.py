"""The ranking application: a FastAPI ingress in front of the ranker replicas.

    python -m pipelines.serve --config demo          # on an embedded Ray
    serve run serving.app:build config=demo          # the same application under the Serve CLI

Routes: ``POST /rank`` (SERVING.md), ``GET /healthz`` (the ingress is up), ``GET /readyz``
(a ranker replica answers, with its model version), ``GET /metrics`` (Prometheus text),
``GET /docs`` (OpenAPI). The ingress validates and sizes requests (serving/api.py), resolves
the SLO class to a deadline, and forwards to the ranker deployment, whose handle routes by
user (serving/router.py). Errors: 413, 422 naming the field, 401 without the API key when one
is configured, 429/503 with ``reason`` and Retry-After.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself in the class-based
# routes, or it takes the parameter for a query field.
import asyncio
import hmac
import logging
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect

from components import object_store
from components.bundle import default_bundle_dir
from components.config_loader import ConfigError, from_dict, merge, parse_overrides, read_preset, to_dict
from components.lake import LakeConfig, lake_root
from models.variants import ModelConfig
from serving.api import RankRequest, RequestError, parse_request, read_body
from serving.config import ServeConfig
from serving.metrics import HttpCounters, MetricsHub, render
from serving.ranker import DRAIN_CHECK_S, ranker_deployment

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


def application(config: ServeConfig, bundle: str, lake_root: str, storage_options: dict[str, str]):
    """The bound application (ingress -> ranker replicas, metrics hub)."""
    hub = serve.deployment(
        name="Metrics",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=64,
        max_queued_requests=256,
        graceful_shutdown_wait_loop_s=DRAIN_CHECK_S,
        logging_config={"enable_access_log": config.access_log},
    )(MetricsHub)
    metrics = hub.bind()
    ranker = ranker_deployment(config).bind(bundle, lake_root, storage_options, to_dict(config), metrics)
    ingress = Ingress.options(
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        graceful_shutdown_wait_loop_s=DRAIN_CHECK_S,
        logging_config={"enable_access_log": config.access_log},
    )
    return ingress.bind(ranker, metrics, to_dict(config), api_key_of(config))


def api_key_of(config: ServeConfig) -> str:
    """The key /rank requires, read by the deploying process from the variable the config names.

    It reaches the ingress replicas as an init argument (Serve keeps those in its controller):
    use a key meant for this service only."""
    if not config.api_key_env:
        return ""
    key = os.environ.get(config.api_key_env, "")
    if not key:
        raise ConfigError(f"serve.api_key_env names {config.api_key_env!r}, which is not set or empty")
    return key


def resolve(args: dict[str, str]) -> tuple[ServeConfig, str, str, dict[str, str]]:
    """``build``'s arguments -> (serve config, bundle folder or URI, lake root, storage options).

    Reads the preset's ``serve`` and ``lake`` sections (overrides as ``serve.num_replicas=2``);
    the bundle is ``bundle=``, else ``serve.bundle``, else the one ``export`` writes for the
    preset's run (``export.output`` or ``bundles/<train.run_name or model.variant>``). Only the
    sections serving reads are validated here: ``python -m pipelines.serve`` checks the whole
    preset and the bundle before deploying."""
    args = dict(args)
    preset, bundle = args.pop("config", "demo"), args.pop("bundle", "")
    data = merge(read_preset(preset), parse_overrides([f"--{key}={value}" for key, value in args.items()]))
    config = from_dict(ServeConfig, data.get("serve"), "serve")
    lake_config = from_dict(LakeConfig, data.get("lake"), "lake")
    if not bundle:
        train, model = data.get("train") or {}, data.get("model") or {}
        run_name = train.get("run_name") or model.get("variant") or ModelConfig().variant
        bundle = config.bundle or default_bundle_dir((data.get("export") or {}).get("output", ""), run_name)
    return config, object_store.absolute(bundle), lake_root(lake_config.root), lake_config.storage_options


def build(args: dict[str, str]):
    """``serve run serving.app:build [config=PRESET] [bundle=PATH] [section.key=value ...]``
    (see :func:`resolve`)."""
    return application(*resolve(args))
