"""An open-loop HTTP/1.1 sender on plain sockets: sends wait for nothing but the clock.

The load generator's lag (actual minus scheduled send) must stay within 2 ms at p99, or a run
measures the generator instead of the service. An asyncio client cannot promise that on a
small machine: a send is a task that runs only after the loop has finished whatever callbacks
(response parsing, connection bookkeeping) became ready before it. Here the send is the loop's
first duty: one thread, keep-alive connections opened before the clock starts, requests
serialised to bytes in advance, and between sends only ``select`` and ``recv`` into a buffer;
headers are read just far enough to know where a response ends, and JSON is parsed by the
caller after the run. Standard library only (the generator's process starts in well under a second).
"""

from __future__ import annotations

import contextlib
import gc
import selectors
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

SPIN_S = 0.002  # wake this long before a send, then spin: epoll's timeout rounds to whole ms
PREOPEN = 32  # keep-alive connections opened before the clock starts (more are opened on demand)


@dataclass(frozen=True)
class Outgoing:
    """One request: when to send it (seconds from the start) and its HTTP message."""

    at_s: float
    message: bytes


@dataclass
class Answer:
    """What came back for one request: times are seconds from the start (``sent_s``: when the
    send began; ``done_s``: when the response's last byte was read)."""

    sent_s: float = float("nan")
    done_s: float = float("nan")
    status: int = 0  # 0: no HTTP answer (``error`` says why)
    body: bytes = b""
    error: str = ""


@dataclass
class _Connection:
    sock: socket.socket
    request: int = -1  # the index of the request in flight, -1 when idle
    buffer: bytearray = field(default_factory=bytearray)


def http_message(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """A ``POST`` request with a body, keep-alive (HTTP/1.1)."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def split_url(url: str) -> tuple[str, int]:
    """``http://host:port`` -> (host, port); other schemes are refused by name."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the open-loop sender speaks plain http://host:port, got {url!r}")
    return parts.hostname, parts.port or 80


class _Head(NamedTuple):
    status: int
    fields: dict[str, str]  # header names lower-cased
    start: int  # where the body starts in the buffer
    reusable: bool  # HTTP/1.1 without ``Connection: close``: the server keeps the connection


def _head(buffer: bytearray) -> _Head | None:
    """The response's head once ``buffer`` holds all of it, else None."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = bytes(buffer[:head_end]).decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ", 2)[:2]
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    reusable = version.upper() == "HTTP/1.1" and fields.get("connection", "").lower() != "close"
    return _Head(int(status), fields, head_end + 4, reusable)


def response_end(buffer: bytearray) -> tuple[int, int] | None:
    """(status, length of the complete response) if ``buffer`` holds one, else None. Knows
    Content-Length and chunked bodies; a response with neither ends when the server closes
    (the caller's EOF), which this reports as not yet complete."""
    head = _head(buffer)
    end = None if head is None else _end(buffer, head)
    return None if end is None else (head.status, end)


def _end(buffer: bytearray, head: _Head) -> int | None:
    """Where the response whose head is ``head`` ends in ``buffer``; None: not all there."""
    status, fields, start = head.status, head.fields, head.start
    if "content-length" in fields:
        end = start + int(fields["content-length"])
        return end if len(buffer) >= end else None
    if fields.get("transfer-encoding", "").lower() == "chunked":
        at = start
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
            at = line_end + 2 + size + 2  # past the chunk and its CRLF
            if size == 0:  # the last chunk; trailers, if any, end with an empty line
                end = buffer.find(b"\r\n\r\n", line_end)
                return end + 4 if end >= 0 else None
            if len(buffer) < at:
                return None
    if status in (204, 304) or 100 <= status < 200:
        return start
    return None  # the body runs to the connection's close


def _body(buffer: bytearray, head: _Head, length: int) -> bytes:
    """The body of the complete response in ``buffer[:length]`` (chunked bodies joined)."""
    body = bytes(buffer[head.start : length])
    if head.fields.get("transfer-encoding", "").lower() != "chunked":
        return body
    out, at = bytearray(), 0
    while True:
        line_end = body.find(b"\r\n", at)
        size = int(body[at:line_end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[line_end + 2 : line_end + 2 + size]
        at = line_end + 2 + size + 2


def send_open_loop(url: str, requests: Sequence[Outgoing], timeout_s: float, lead_s: float = 0.2) -> list[Answer]:
    """Send every request at its ``at_s`` after the start (``lead_s`` from now, once the
    connections are open), whatever came back before; return one ``Answer`` per request in
    order. A request not answered within ``timeout_s`` of its send gets status 0 and error
    ``TimeoutError``; a connection the server drops mid-answer, ``ServerDisconnected``."""
    host, port = split_url(url)
    selector = selectors.DefaultSelector()
    idle: list[_Connection] = []

    def connect() -> _Connection:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(sock)
        selector.register(sock, selectors.EVENT_READ, conn)
        return conn

    def close(conn: _Connection) -> None:
        selector.unregister(conn.sock)
        conn.sock.close()

    answers = [Answer() for _ in requests]
    busy: dict[int, _Connection] = {}  # request index -> its connection
    try:
        idle.extend(connect() for _ in range(min(PREOPEN, len(requests))))
        clock = time.perf_counter
        gc.collect()
        start = clock() + lead_s
        order = sorted(range(len(requests)), key=lambda i: requests[i].at_s)
        nxt = 0
        gc.disable()  # a collection in the middle of the run is a multi-ms pause of every send
        try:
            while nxt < len(order) or busy:
                now = clock()
                if nxt < len(order):
                    i = order[nxt]
                    target = start + requests[i].at_s
                    if now >= target - SPIN_S:
                        while clock() < target:
                            pass
                        conn = idle.pop() if idle else connect()
                        answers[i].sent_s = clock() - start
                        try:
                            conn.sock.sendall(requests[i].message)
                            conn.request = i
                            busy[i] = conn
                        except OSError as exc:  # a keep-alive connection the server closed
                            answers[i].error, answers[i].done_s = type(exc).__name__, clock() - start
                            close(conn)
                        nxt += 1
                        continue
                    wait = target - SPIN_S - now
                else:
                    wait = 0.05
                for key, _ in selector.select(max(wait, 0.0)):
                    _read(key.data, answers, busy, idle, close, clock() - start)
                _expire(answers, busy, close, clock() - start, timeout_s)
        finally:
            gc.enable()
    finally:
        for conn in [*idle, *busy.values()]:
            with contextlib.suppress(OSError, KeyError, ValueError):
                close(conn)
        selector.close()
    return answers


def _read(conn: _Connection, answers, busy, idle, close, now_s: float) -> None:
    """Take what arrived on ``conn``; finish its request if the response is complete."""
    try:
        data = conn.sock.recv(1 << 16)
    except OSError:
        data = b""
    if data:
        conn.buffer += data
        if conn.request < 0:  # bytes nobody asked for: the connection is unusable
            idle.remove(conn)
            close(conn)
            return
        head = _head(conn.buffer)
        end = None if head is None else _end(conn.buffer, head)
        if end is None:
            return
        answer = answers[conn.request]
        answer.done_s, answer.status, answer.body = now_s, head.status, _body(conn.buffer, head, end)
        del busy[conn.request]
        if not head.reusable:  # the server closes it next: reusing it would race that close
            close(conn)
            return
        conn.request, conn.buffer = -1, bytearray()
        idle.append(conn)
        return
    # The server closed: a response without a length ends here; anything else was cut short.
    if conn.request >= 0:
        answer, head = answers[conn.request], _head(conn.buffer)
        if head is not None:
            answer.done_s, answer.status, answer.body = now_s, head.status, bytes(conn.buffer[head.start :])
        else:
            answer.error, answer.done_s = "ServerDisconnected", now_s
        del busy[conn.request]
    else:
        idle.remove(conn)
    close(conn)


def _expire(answers, busy, close, now_s: float, timeout_s: float) -> None:
    """Give up on requests in flight longer than ``timeout_s`` (their connections are closed)."""
    late = [i for i, conn in busy.items() if now_s - answers[i].sent_s > timeout_s]
    for i in late:
        answers[i].error, answers[i].done_s = "TimeoutError", now_s
        close(busy.pop(i))
