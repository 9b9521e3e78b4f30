"""The open-loop sender: response framing, keep-alive reuse, sends that wait for no answer,
and every way a request can go unanswered."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines.open_loop_sender import Outgoing, http_message, response_end, send_open_loop, split_url


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", (200, 40)),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{", None),  # the body is not all there
        (b"HTTP/1.1 200 OK\r\ncontent-len", None),  # nor the head
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", (503, 55)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", (200, 59)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n", None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n\r\n", (200, 60)),
        (b"HTTP/1.1 204 No Content\r\n\r\n", (204, 27)),
        (b"HTTP/1.0 200 OK\r\n\r\n{}", None),  # no length: it ends when the server closes
    ],
)
def test_a_response_ends_where_its_framing_says(raw, expected):
    assert response_end(bytearray(raw)) == expected
    if expected is not None:
        assert expected[1] == len(raw)


def test_only_plain_http_urls_are_accepted():
    assert split_url("http://127.0.0.1:8000") == ("127.0.0.1", 8000)
    for bad in ("https://example.com", "127.0.0.1:8000", "http://"):
        with pytest.raises(ValueError, match="plain http"):
            split_url(bad)


def test_the_message_is_a_keep_alive_post_with_its_length():
    message = http_message("h:1", "/rank", b'{"a": 1}', {"Content-Type": "application/json", "X-Session-Id": "7"})
    head, body = message.split(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"POST /rank HTTP/1.1" and body == b'{"a": 1}'
    assert b"Content-Length: 8" in head and b"X-Session-Id: 7" in head and b"Connection" not in head


class _Server:
    """A real HTTP/1.1 server in a thread; ``handle(index, handler)`` writes each answer."""

    def __init__(self, handle) -> None:
        lock, seen, ports = threading.Lock(), [], set()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Serve's proxy

            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                with lock:
                    index = len(seen)
                    seen.append(body)
                    ports.add(self.client_address[1])
                handle(index, self)

            def log_message(self, *args):
                pass

        self.seen, self.ports = seen, ports
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _answer(handler, status: int = 200, body: bytes = b'{"ok": true}') -> None:
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _requests(server: _Server, count: int, every_s: float) -> list[Outgoing]:
    host = server.url.removeprefix("http://")
    return [Outgoing(every_s * i, http_message(host, "/rank", f'{{"i": {i}}}'.encode(), {})) for i in range(count)]


def test_sends_wait_for_no_answer():
    """Open loop: the first request is answered only once all five have arrived (a closed-loop
    client would deadlock here and time out)."""
    all_in = threading.Event()

    def handle(index, handler):
        if index == 4:
            all_in.set()
        all_in.wait(timeout=20)
        _answer(handler, body=b'{"index": %d}' % index)

    server = _Server(handle)
    try:
        answers = send_open_loop(server.url, _requests(server, 5, 0.01), timeout_s=30)
    finally:
        server.close()
    assert all_in.is_set()
    assert [a.status for a in answers] == [200] * 5 and all(a.error == "" for a in answers)
    assert sorted(server.seen) == sorted(f'{{"i": {i}}}'.encode() for i in range(5))
    assert all(a.sent_s <= a.done_s for a in answers)
    assert [a.sent_s for a in answers] == sorted(a.sent_s for a in answers)


def test_connections_are_kept_alive_and_reused():
    server = _Server(lambda index, handler: _answer(handler))
    try:
        answers = send_open_loop(server.url, _requests(server, 40, 0.005), timeout_s=30)
    finally:
        server.close()
    assert [a.status for a in answers] == [200] * 40 and all(a.body == b'{"ok": true}' for a in answers)
    # One request at a time needs one connection; the pre-opened pool bounds what can be used.
    assert 1 <= len(server.ports) <= 32


def test_a_chunked_answer_and_an_error_status_are_read_whole():
    def handle(index, handler):
        if index == 0:
            handler.send_response(200)
            handler.send_header("transfer-encoding", "chunked")
            handler.end_headers()
            handler.wfile.write(b'3\r\n{"a\r\n5\r\n": 1}\r\n0\r\n\r\n')
        else:
            _answer(handler, status=429, body=b'{"error": "overloaded"}')

    server = _Server(handle)
    try:
        answers = send_open_loop(server.url, _requests(server, 2, 0.05), timeout_s=30)
    finally:
        server.close()
    assert (answers[0].status, answers[0].body) == (200, b'{"a": 1}')
    assert (answers[1].status, answers[1].body) == (429, b'{"error": "overloaded"}')


def test_an_unanswered_request_times_out_and_a_dropped_one_is_reported():
    release = threading.Event()

    def handle(index, handler):
        if index == 0:
            release.wait(timeout=20)  # never answered in time
        else:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-le")  # cut short
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)

    server = _Server(handle)
    try:
        answers = send_open_loop(server.url, _requests(server, 2, 0.05), timeout_s=1.0)
    finally:
        release.set()
        server.close()
    assert (answers[0].status, answers[0].error) == (0, "TimeoutError")
    assert answers[0].done_s - answers[0].sent_s >= 1.0
    assert (answers[1].status, answers[1].error) == (0, "ServerDisconnected")


def test_a_server_that_is_not_there_is_an_error_before_the_clock_starts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ConnectionRefusedError):
        send_open_loop(f"http://127.0.0.1:{port}", [Outgoing(0.0, b"")], timeout_s=1.0)
