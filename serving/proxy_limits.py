"""A ceiling on request bodies inside Ray Serve's HTTP proxy, so a 100 MB upload never sits in
the server's memory.

Why the proxy: Serve's proxy reads a request body from the socket into an unbounded queue for
the ingress replica (``proxy_asgi_receive`` in ray/serve/_private/proxy.py), whether or not the
ingress reads it. The ingress refuses a body past ``serve.max_body_bytes`` (serving/api.py), but
the proxy went on buffering the rest: measured, its memory grew by ~180 MiB for a 200 MB chunked
upload. The proxy takes ASGI middlewares only from a callback named by an environment variable
that must be set before Ray starts its workers:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.proxy_limits:middlewares
    ULTRARANK_PROXY_MAX_BODY_BYTES=2097152   # optional; the default below

``pipelines.ray_runtime`` sets both for an embedded Ray; a cluster (``serve run`` on it, KubeRay)
sets them in the head's and workers' environment. The ceiling must be at least
``serve.max_body_bytes`` (``pipelines.serve`` checks it), so the ingress still answers 413 with
its own limit: the proxy only stops reading past the ceiling. A body whose Content-Length is
over the ceiling is answered 413 here and never read.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serving.proxy_limits:middlewares"
CEILING_ENV = "ULTRARANK_PROXY_MAX_BODY_BYTES"
DEFAULT_CEILING = 2 << 20


def ceiling() -> int:
    """The proxy's body ceiling in bytes (``ULTRARANK_PROXY_MAX_BODY_BYTES`` or 2 MiB)."""
    raw = os.environ.get(CEILING_ENV, "")
    try:
        value = int(raw) if raw else DEFAULT_CEILING
    except ValueError:
        raise ValueError(f"{CEILING_ENV}={raw!r} is not a number of bytes") from None
    if value < 1024:
        raise ValueError(f"{CEILING_ENV}={value} is below 1024 bytes")
    return value


# Serve's controller kills a proxy whose ready check misses 5 s three times. A fresh proxy on a
# busy 2-core machine can need longer (the check logs "didn't complete in 5.0s" even idle here),
# and under two busy loops serve.start then failed with the killed proxy's ActorDiedError.
PROXY_PATIENCE_S = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def proxy_environment() -> dict[str, str]:
    """The variables a Ray instance's workers need for the ceiling and for patient proxy health
    checks (set before Ray starts: its Serve controller and proxies read them)."""
    return {CALLBACK_ENV: CALLBACK, CEILING_ENV: str(ceiling()), **PROXY_PATIENCE_S}


def installed() -> bool:
    """Whether this process's environment installs the ceiling in the Serve proxies it starts."""
    return os.environ.get(CALLBACK_ENV, "") == CALLBACK


class BodyCeiling:
    """ASGI middleware: 413 for a declared length over ``max_bytes``; for a chunked body, stop
    reading once ``max_bytes`` have passed (the app is answered by then: its own limit is lower)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            body = json.dumps(
                {"error": "body_too_large", "detail": {"limit_bytes": self.max_bytes, "content_length": int(declared)}}
            ).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            if seen <= self.max_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                seen += len(message.get("body", b""))
                if seen <= self.max_bytes:
                    return message
            # Past the ceiling: stop reading (the socket's flow control then holds the client).
            # Not a disconnect: Serve's proxy would cancel the request and answer 500 instead of
            # the ingress's 413; it cancels this wait once the response is sent.
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        await self.app(scope, limited, send)


def middlewares() -> list:
    """The callback Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(BodyCeiling, max_bytes=ceiling())]
