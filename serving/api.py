"""``POST /rank`` of SERVING.md: the request schema, a bounded body reader and the error bodies.

Every malformed request is answered 422 with the offending field named, before any model
work: wrong types (strict: no "5" for 5, no true for 1), extra fields, NaN/Infinity (JSON
extensions Python would otherwise accept), integers outside int64, duplicate or too many
candidates, JSON nested deeper than ``MAX_JSON_DEPTH`` (refused before decoding). A body
above the limit is refused 413 from its Content-Length, or as soon as a chunked body passes
the limit; the proxy in front stops reading past its own ceiling
(serving/proxy_limits.py), so a 100 MB upload never sits in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The routing key of POST /rank: the user id, in the header Serve's proxy reads as the session id
# (``RAY_SERVE_SESSION_ID_HEADER_KEY``, default ``x-session-id``). The proxy routes on it without
# reading the body, straight to the replica holding the user's state (serving/router.py); a
# request without it is still served, one hop later.
SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"


def routing_header() -> str:
    """The routing header's name, as Serve's proxy reads it (lower case)."""
    return os.environ.get(SESSION_HEADER_ENV, "x-session-id").lower()


def routing_headers(user_id: int) -> dict[str, str]:
    """The header a client sends with a request for ``user_id`` so the proxy routes it by user."""
    return {routing_header(): str(user_id)}


Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


class RankRequest(BaseModel):
    """One ranking request: a user and the candidate item ids to score."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: Int64 = Field(description="raw user id (int64)")
    candidates: list[Int64] = Field(min_length=1, description="unique raw item ids (int64) to score")
    slo_class: str | None = Field(default=None, max_length=32, description="a configured SLO class")
    deadline_ms: float | None = Field(default=None, gt=0, le=600_000, description="deadline from arrival, ms")
    request_id: str | None = Field(default=None, min_length=1, max_length=128)
    request_ts: int | None = Field(default=None, ge=0, le=2**40, description="request time (unix seconds); default now")
    allow_degraded: bool | None = Field(
        default=None,
        description=(
            "when all candidates cannot be scored by the deadline, score the first ones that can (the rest "
            "listed in `unscored`, `degraded` true) rather than answer 503; default: serve.scheduler.degrade"
        ),
    )

    @field_validator("candidates")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            seen, dup = set(), None
            for item in value:
                if item in seen:
                    dup = item
                    break
                seen.add(item)
            raise ValueError(f"candidates must be unique; {dup} appears more than once")
        return value

    @field_validator("deadline_ms")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("deadline_ms must be finite")
        return value


class RequestError(Exception):
    """An HTTP error answered by the ingress: status, a machine-readable reason, details."""

    def __init__(self, status: int, reason: str, detail: Any = None, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.detail, self.retry_after_s = status, reason, detail, retry_after_s

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.reason}
        if self.detail is not None:
            out["detail"] = self.detail
        return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (NaN and Infinity are not numbers here)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")
    return value


# A rank request nests two deep ({"candidates": [...]}). Python's decoder recurses once per
# level: 100,000 nested arrays raise RecursionError (a 5xx if uncaught) after burning the stack,
# so the depth is measured on the bytes first, and anything past this is refused 422.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')  # a string literal, escapes included


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays and objects in ``body``, brackets inside strings not counted.

    Linear and vectorised (a 1 MB body takes milliseconds); on malformed JSON the figure is
    approximate, which is fine: the decoder rejects such a body anyway."""
    text = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    if not text.size:
        return 0
    opens = (text == ord("[")) | (text == ord("{"))
    closes = (text == ord("]")) | (text == ord("}"))
    return int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))


def parse_request(body: bytes, max_candidates: int) -> RankRequest:
    """Bytes -> ``RankRequest``; ``RequestError(422)`` naming the field otherwise."""
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        message = f"JSON nested {depth} deep; at most {MAX_JSON_DEPTH} levels are accepted"
        raise RequestError(422, "invalid_json", [{"field": "body", "message": message}])
    try:
        data = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(422, "invalid_json", [{"field": "body", "message": str(exc)[:200]}]) from exc
    if not isinstance(data, dict):
        raise RequestError(422, "invalid_request", [{"field": "body", "message": "expected a JSON object"}])
    try:
        request = RankRequest.model_validate(data)
    except ValidationError as exc:
        detail = [
            {"field": ".".join(str(p) for p in err["loc"]) or "body", "message": err["msg"]} for err in exc.errors()
        ]
        raise RequestError(422, "invalid_request", detail) from exc
    if len(request.candidates) > max_candidates:
        raise RequestError(
            422,
            "invalid_request",
            [{"field": "candidates", "message": f"{len(request.candidates)} candidates; at most {max_candidates}"}],
        )
    return request


async def read_body(receive_stream, content_length: str | None, limit: int) -> bytes:
    """The body, refusing (413) past ``limit`` bytes: by Content-Length before reading, or while
    reading a chunked body (stops reading at once: memory stays bounded)."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError as exc:
            raise RequestError(400, "bad_content_length") from exc
        if declared > limit:
            raise RequestError(413, "body_too_large", {"limit_bytes": limit, "content_length": declared})
    chunks, total = [], 0
    async for chunk in receive_stream:
        total += len(chunk)
        if total > limit:
            raise RequestError(413, "body_too_large", {"limit_bytes": limit})
        chunks.append(chunk)
    return b"".join(chunks)
