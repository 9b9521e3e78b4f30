"""The open-loop load generator, light enough to run as a process of its own.

    python -m pipelines.load_generator --url URL --schedule schedule.jsonl --out records.jsonl \\
        [--deadlines '{"tight": 50, ...}']       # the API key, if any, from ULTRARANK_LOADTEST_API_KEY

``fire`` sends a schedule open loop (every request at its scheduled time whether or not
earlier ones were answered) and records per request its status, latency from the scheduled
time and the generator's own lag. ``fire_apart`` runs it in a child process, away from the Ray
driver's threads; with ``pin`` (``loadtest.pin_generator``) the child gets a core of its own and
the caller's process tree (an embedded Ray: GCS, raylet, Serve's proxy and replicas) the other
cores. This module imports no Ray and no torch (a child starts in well under a second).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from components.load_schedule import ScheduledRequest, read_schedule, write_schedule
from pipelines.open_loop_sender import Outgoing, http_message, send_open_loop, split_url
from serving.api import routing_headers

API_KEY_ENV = "ULTRARANK_LOADTEST_API_KEY"  # the key reaches the child by environment, never argv


@contextlib.contextmanager
def generator_priority(nice: int = -10, realtime: bool = True):
    """Run the generator's thread at a higher CPU priority where allowed (root, CAP_SYS_NICE):
    on a small machine it shares the cores with the service, and a generator that wakes late
    measures itself (lag), not the service.

    First choice: ``SCHED_FIFO`` at the lowest real-time priority, so that a send due preempts
    any ordinary process at once (a nice level only shortens the wait for the CPU). The sender
    sleeps in ``select`` between sends and spins at most ``open_loop_sender.SPIN_S`` before each, and the kernel
    keeps a share of every second for ordinary processes (``sched_rt_runtime_us``), so the
    service is not starved. Next: ``nice``. Without either right it runs as it is, and lag shows
    it. Yields what it got: "fifo", "nice" or ""."""
    if realtime and hasattr(os, "sched_setscheduler"):
        try:
            before_policy, before_param = os.sched_getscheduler(0), os.sched_getparam(0)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(os.sched_get_priority_min(os.SCHED_FIFO)))
        except OSError:
            pass
        else:
            try:
                yield "fifo"
            finally:
                os.sched_setscheduler(0, before_policy, before_param)
            return
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # on Linux: this thread (and threads it starts)
    except OSError:
        yield ""
        return
    try:
        yield "nice"
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


def _set_affinity(pid: int, cores: set[int]) -> set[int] | None:
    """Pin every thread of process ``pid`` to ``cores`` (Linux affinity is per thread: threads a
    process already runs keep their own); returns the main thread's previous set, None if the
    process is gone or not ours to pin."""
    try:
        before = os.sched_getaffinity(pid)
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # a thread that just exited
                os.sched_setaffinity(int(tid), cores)
        return before
    except OSError:
        return None


@contextlib.contextmanager
def generator_core(enabled: bool = True, apart: bool = False):
    """Give the generator a core of its own, and this process's descendants (an embedded Ray:
    GCS, raylet, Serve's proxy and replicas) the others, for the ``with`` block.

    On a small machine the generator shares the cores with what it measures, and a generator
    that wakes late measures itself (lag). Yields the generator's core, or None where there is
    nothing to split (one core, no ``/proc``). A service in other processes (``--url`` of a
    separately started service) is not moved: only the generator is then pinned. Affinities are
    restored on exit; processes started meanwhile inherit the pinned set. ``enabled=False``
    (``loadtest.pin_generator``) pins nothing and yields None. ``apart=True``: the generator is a
    process the caller starts inside the block on the yielded core (``fire_apart``), and this
    process goes with its descendants to the other cores; otherwise the generator is this
    process.
    """
    if not enabled or not hasattr(os, "sched_getaffinity") or not os.path.isdir("/proc/self/task"):
        yield None
        return
    import psutil

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        yield None
        return
    mine, rest = {cores[-1]}, set(cores[:-1])
    me = psutil.Process()
    try:
        others = [p.pid for p in me.children(recursive=True)]
    except psutil.Error:
        others = []
    before = {os.getpid(): _set_affinity(os.getpid(), rest if apart else mine)}
    before.update({pid: _set_affinity(pid, rest) for pid in others})
    try:
        yield cores[-1]
    finally:
        for pid, cpus in before.items():
            if cpus is not None:
                _set_affinity(pid, cpus)


def fire(
    url: str,
    schedule: Sequence[ScheduledRequest],
    deadlines_ms: dict[str, float],
    api_key: str = "",
    unrouted_every: int = 0,
) -> list[dict]:
    """Send ``schedule`` open loop; one record per request (times relative to the run start).

    Sends are made by ``send_open_loop`` (plain sockets, no event loop between the clock and a
    send). Every request carries its user in the routing header, as the API asks of clients, so
    Serve's proxy routes it to the replica that holds the user's state; with ``unrouted_every``
    k > 0, every k-th request goes without it (``routed`` false in its record), to measure in the
    same run what the hop of a forwarded request costs."""
    host, port = split_url(url)
    headers = {"Content-Type": "application/json", **({"X-Api-Key": api_key} if api_key else {})}
    unrouted = [unrouted_every > 0 and (i + 1) % unrouted_every == 0 for i in range(len(schedule))]
    outgoing = [
        Outgoing(
            r.at_ms / 1000.0,
            http_message(
                f"{host}:{port}",
                "/rank",
                json.dumps(r.body()).encode(),
                {**headers, **({} if skip else routing_headers(r.user_id))},
            ),
        )
        for r, skip in zip(schedule, unrouted)
    ]
    answers = send_open_loop(url, outgoing, timeout_s=max(deadlines_ms.values()) / 1000.0 * 20 + 5)
    records = []
    for request, skip, answer in zip(schedule, unrouted, answers):
        record = {
            "request_id": request.request_id,
            "user_id": request.user_id,
            "slo_class": request.slo_class,
            "candidates": len(request.candidates),
            "deadline_ms": deadlines_ms[request.slo_class],
            "scheduled_ms": round(request.at_ms, 3),
            "lag_ms": round(answer.sent_s * 1000.0 - request.at_ms, 3),
            "routed": not skip,
            "status": answer.status,
            "latency_ms": round(answer.done_s * 1000.0 - request.at_ms, 3),
        }
        try:
            body = json.loads(answer.body) if answer.body else {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if answer.status == 200:
            for key in ("cache_hit", "replica", "queue_ms", "compute_ms", "degraded"):
                record[key] = body.get(key)
        else:
            record["reason"] = answer.error or str(body.get("error", ""))
        record["good"] = record["status"] == 200 and record["latency_ms"] <= record["deadline_ms"]
        records.append(record)
    return records


def fire_apart(
    url: str,
    schedule: Sequence[ScheduledRequest],
    deadlines_ms: dict[str, float],
    api_key: str = "",
    pin: bool = True,
    unrouted_every: int = 0,
) -> tuple[list[dict], int | None]:
    """``fire`` in a child process; with ``pin`` the child on a core of its own and this process
    tree on the others (``generator_core(apart=True)``). Returns the records and the child's core
    (None: not pinned)."""
    with tempfile.TemporaryDirectory(prefix="ultrarank-load-") as tmp:
        schedule_path, out_path = Path(tmp) / "schedule.jsonl", Path(tmp) / "records.jsonl"
        write_schedule(schedule_path, schedule)
        args = [
            sys.executable,
            "-m",
            "pipelines.load_generator",
            "--url",
            url,
            "--schedule",
            str(schedule_path),
            "--out",
            str(out_path),
            "--deadlines",
            json.dumps(deadlines_ms),
            "--unrouted-every",
            str(unrouted_every),
        ]
        env = {**os.environ, API_KEY_ENV: api_key}
        with generator_core(pin, apart=True) as core:
            on_core = None if core is None else (lambda: os.sched_setaffinity(0, {core}))
            done = subprocess.run(args, env=env, preexec_fn=on_core, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the load generator failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        with open(out_path) as f:
            return [json.loads(line) for line in f if line.strip()], core


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.load_generator", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the service's base URL (POST {url}/rank)")
    parser.add_argument("--schedule", required=True, help="a schedule JSONL (components/load_schedule.py)")
    parser.add_argument("--out", required=True, help="where to write one JSON record per request")
    parser.add_argument("--deadlines", default='{"tight": 50, "normal": 150, "loose": 500}', help="class -> ms")
    parser.add_argument(
        "--unrouted-every", type=int, default=0, help="send every k-th request without the routing header (0: none)"
    )
    args = parser.parse_args(argv)
    try:
        deadlines = {str(k): float(v) for k, v in json.loads(args.deadlines).items()}
        schedule = read_schedule(args.schedule)
        split_url(args.url)
    except (OSError, ValueError, AttributeError) as exc:
        print(f"load_generator: {exc}", file=sys.stderr)
        return 2
    if args.unrouted_every < 0:
        print(f"load_generator: --unrouted-every must be >= 0, got {args.unrouted_every}", file=sys.stderr)
        return 2
    missing = sorted({r.slo_class for r in schedule} - set(deadlines))
    if missing:
        print(f"load_generator: no deadline for SLO class(es) {missing} in --deadlines", file=sys.stderr)
        return 2
    with generator_priority():
        key = os.environ.get(API_KEY_ENV, "")
        try:
            records = fire(args.url, schedule, deadlines, key, args.unrouted_every)
        except OSError as exc:  # nothing listens there: no records, no half-written file
            print(f"load_generator: cannot reach {args.url}: {exc}", file=sys.stderr)
            return 1
    partial = Path(args.out + ".partial")
    with open(partial, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    partial.replace(args.out)  # all records or none
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
