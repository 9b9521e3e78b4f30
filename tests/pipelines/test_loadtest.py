"""The load test's latency axis: a few plain, distinct ticks over any range."""

from __future__ import annotations

import pytest

from pipelines.loadtest import log_ticks


@pytest.mark.parametrize(("low", "high"), [(30.2, 44.9), (1.3, 4800.0), (7.0, 7.0), (0.0, 12.0)])
def test_log_ticks_are_few_distinct_round_values_over_the_range(low, high):
    ticks = log_ticks(low, high)
    assert 1 <= len(ticks) <= 5 and ticks == sorted(set(ticks))
    assert all(float(f"{t:.2g}") == t for t in ticks)  # two significant digits: short labels
    assert ticks[0] <= max(low, 1e-3) * 1.05 and ticks[-1] >= high * 0.95


def test_a_narrow_range_still_gets_several_labels():
    assert log_ticks(30.2, 44.9) == [30.0, 33.0, 37.0, 41.0, 45.0]


def _thread_affinities(pid: int) -> list[set[int]]:
    import os

    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_the_generator_gets_a_core_of_its_own_and_its_descendants_every_thread_the_others():
    import os
    import subprocess
    import sys

    from pipelines.load_generator import generator_core

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: nothing to split (the one-core decision is tested below)")
    # A child with a second thread already running: affinity is per thread in Linux.
    code = (
        "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
        "print(1, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"1"
        before_child = _thread_affinities(child.pid)
        with generator_core() as core:
            assert core == cores[-1]
            assert os.sched_getaffinity(0) == {cores[-1]}
            assert _thread_affinities(child.pid) == [set(cores[:-1])] * len(before_child)
            assert len(before_child) >= 2
        assert os.sched_getaffinity(0) == set(cores)
        assert _thread_affinities(child.pid) == before_child
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_on_one_core_the_generator_is_not_pinned():
    import os

    from pipelines.load_generator import generator_core

    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        with generator_core() as core:
            assert core is None and os.sched_getaffinity(0) == {min(cores)}
    finally:
        os.sched_setaffinity(0, cores)


def test_with_pinning_off_nothing_is_pinned():
    import os

    from pipelines.load_generator import generator_core

    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    with generator_core(enabled=False) as core:
        assert core is None
        if cores is not None:
            assert os.sched_getaffinity(0) == cores


def test_the_generator_apart_fires_a_schedule_from_its_own_process_and_core():
    """A real HTTP server in this process, the generator in a child: every request answered,
    recorded with its lag, the child on the generator core, this process on the others."""
    import json
    import os
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from components.load_schedule import ScheduledRequest
    from pipelines.load_generator import fire_apart

    seen: list[tuple[dict, set[int] | None, str]] = []
    routes: dict[int, str | None] = {}  # user -> the routing header it came with

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
            seen.append((body, affinity, self.headers.get("x-api-key", "")))
            routes[body["user_id"]] = self.headers.get("x-session-id")
            data = json.dumps({"cache_hit": False, "replica": "r", "queue_ms": 0, "compute_ms": 1}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        schedule = [ScheduledRequest(20.0 * i, f"r{i}", 7 + i, (1, 2, 3), "tight") for i in range(5)]
        url = f"http://127.0.0.1:{server.server_port}"
        records, core = fire_apart(url, schedule, {"tight": 50.0}, api_key="k1", pin=True, unrouted_every=2)
    finally:
        server.shutdown()
    assert [r["request_id"] for r in records] == [f"r{i}" for i in range(5)]
    assert all(r["status"] == 200 and r["lag_ms"] >= 0 for r in records)
    assert sorted(b["user_id"] for b, _, _ in seen) == [7, 8, 9, 10, 11] and {k for _, _, k in seen} == {"k1"}
    # The user in the routing header, except every second request (the bench's forwarded half).
    assert routes == {7: "7", 8: None, 9: "9", 10: None, 11: "11"}
    assert [r["routed"] for r in records] == [True, False, True, False, True]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= 2:  # the server ran in this process: on the service's cores, not the generator's
        assert core == cores[-1] and all(a == set(cores[:-1]) for _, a, _ in seen)
    else:
        assert core is None


def test_the_generator_refuses_a_schedule_with_a_class_it_has_no_deadline_for(tmp_path):
    from components.load_schedule import ScheduledRequest, write_schedule
    from pipelines.load_generator import main

    write_schedule(tmp_path / "s.jsonl", [ScheduledRequest(0.0, "r0", 1, (1,), "tight")])
    argv = ["--url", "http://127.0.0.1:9", "--schedule", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--deadlines", '{"loose": 500}']) == 2
    assert main([*argv, "--unrouted-every", "-1"]) == 2
    assert not (tmp_path / "o").exists()


def test_the_generator_says_when_nothing_listens_and_writes_no_records(tmp_path, capsys):
    import socket

    from components.load_schedule import ScheduledRequest, write_schedule
    from pipelines.load_generator import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    write_schedule(tmp_path / "s.jsonl", [ScheduledRequest(0.0, "r0", 1, (1,), "tight")])
    url = f"http://127.0.0.1:{port}"
    assert main(["--url", url, "--schedule", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert f"cannot reach {url}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    assert main(["--url", "https://x", "--schedule", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o")]) == 2


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setscheduler"), reason="no scheduling policies on this OS")
def test_the_generator_takes_the_best_priority_it_may_and_gives_it_back():
    """Real time where allowed, else a nice level, else nothing; restored on exit either way."""
    import os

    policy, nice = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    from pipelines.load_generator import generator_priority

    with generator_priority() as got:
        assert got in ("fifo", "nice", "")
        if got == "fifo":
            assert os.sched_getscheduler(0) == os.SCHED_FIFO
        elif got == "nice":
            assert os.getpriority(os.PRIO_PROCESS, 0) == -10
    assert (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)) == (policy, nice)
    with generator_priority(realtime=False) as got:
        assert got in ("nice", "") and os.sched_getscheduler(0) == policy
    assert os.getpriority(os.PRIO_PROCESS, 0) == nice
