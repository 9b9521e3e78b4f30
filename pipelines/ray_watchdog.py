"""Fate-sharing for an embedded Ray: when the driver dies, its Ray processes die with it.

Why: Ray starts ``gcs_server`` and ``raylet`` with a parent-death signal, so they die with a
SIGKILLed driver, but not what the raylet started. Measured on Ray 2.60 after SIGKILL of the
features driver: idle workers linger 15-30 s, and the dashboard agent and the runtime-env
agent stay for good. Each notices the raylet's death, then blocks in a synchronous call
publishing that death to the (also dead) GCS (``process_watcher.report_raylet_error_logs``,
60 s timeout, retried) inside its event loop, which is also why it ignores SIGTERM. No Ray
setting changes that, so this module does it from outside:

- before ``ray.init`` the driver writes a marker (:class:`DriverMarker`) and starts a watchdog
  process in its own session, holding the read end of a pipe from the driver;
- ``ray.init`` runs with a unique tag in the driver's environment (:data:`TAG_ENV`); every
  process of the instance inherits it (GCS, raylet, agents, workers: Ray renames agents and
  workers, so the tag, not the command line, identifies them; a reused PID never has it);
- while it waits, the watchdog records the driver's descendants (pid and start time) every
  :data:`POLL_S` in the marker: Ray's process titles (setproctitle) can zero the part of
  /proc/<pid>/environ that holds the tag, so the tag alone can miss the agents;
- a clean exit writes ``done`` to the pipe. End of file without it means the driver died:
  the watchdog SIGKILLs every recorded or tagged process (within a second) and removes the marker.
If the watchdog itself was killed too, the next run finds the marker of a dead driver whose
processes still live and reports them (:func:`report_orphans`).

    python -m pipelines.ray_watchdog MARKER_PATH     (started by :class:`Watchdog`, reads stdin)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

TAG_ENV = "ULTRARANK_RAY_OWNER"
DONE = "done"
POLL_S = 0.5  # how often the watchdog records the driver's descendants (a few ms of CPU each)
KILL_ROUNDS = 5
_HAS_PROCFS = os.path.isdir("/proc/self")


def marker_dir() -> Path:
    """Where running embedded instances leave their markers (per user, in the temp dir)."""
    return Path(tempfile.gettempdir()) / f"ultrarank-ray-{os.getuid()}"


@dataclass(frozen=True)
class DriverMarker:
    """One embedded Ray instance: its tag, the driver that owns it (pid + start time, so a
    reused pid is not mistaken for it) and the processes the watchdog has seen it start."""

    tag: str
    driver_pid: int
    driver_started: float
    pids: tuple[tuple[int, float], ...] = ()  # (pid, start time) of the driver's descendants

    @property
    def path(self) -> Path:
        return marker_dir() / f"{self.tag}.json"

    @classmethod
    def load(cls, path: Path) -> DriverMarker | None:
        try:
            data = json.loads(path.read_text())
            return cls(data["tag"], data["driver_pid"], data["driver_started"], tuple(map(tuple, data["pids"])))
        except (OSError, ValueError, TypeError, KeyError):  # gone, or half-written by an older version
            return None

    def save(self) -> None:
        """Write atomically (a reader never sees half a marker)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".part")
        partial.write_text(json.dumps(dataclasses.asdict(self)))
        os.replace(partial, self.path)

    def is_driver_alive(self) -> bool:
        return _same_process(self.driver_pid, self.driver_started) is not None


def _same_process(pid: int, started: float) -> psutil.Process | None:
    """The live (not zombie) process ``pid`` if it is the one that started at ``started``."""
    try:
        proc = psutil.Process(pid)
        if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def _has_tag(proc: psutil.Process, tag: str) -> bool:
    """Whether the process's environment holds ``TAG_ENV=tag``.

    Read from /proc/<pid>/environ entry by entry: psutil's ``environ()`` stops at the first
    empty entry, and Ray's process titles zero the start of that block.
    """
    if not _HAS_PROCFS:  # macOS: psutil's view
        return proc.environ().get(TAG_ENV) == tag
    try:
        with open(f"/proc/{proc.pid}/environ", "rb") as block:
            return f"{TAG_ENV}={tag}".encode() in block.read().split(b"\0")
    except OSError:  # gone, a kernel thread, or another user's process
        return False


def instance_processes(marker: DriverMarker) -> list[psutil.Process]:
    """Live processes of the instance: recorded by the watchdog, or carrying its tag."""
    found = {pid: p for pid, started in marker.pids if (p := _same_process(pid, started)) is not None}
    for proc in psutil.process_iter():
        try:
            if proc.pid not in found and proc.pid != os.getpid() and _has_tag(proc, marker.tag):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.pid] = proc
        except psutil.Error:  # gone, or another user's process
            continue
    return list(found.values())


def kill_instance(marker: DriverMarker) -> list[int]:
    """SIGKILL every live process of the instance, in rounds (a process forked while one round
    ran is caught by the next); returns their pids."""
    killed: list[int] = []
    for _ in range(KILL_ROUNDS):
        procs = instance_processes(marker)
        if not procs:
            break
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed.append(proc.pid)
        time.sleep(0.2)
    return killed


def _names(procs: list[psutil.Process]) -> list[str]:
    """Process titles: Ray renames agents and workers (``ray::RuntimeEnvAgent``, ``ray::IDLE``)."""
    names = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            names.append(os.path.basename((proc.cmdline() or [proc.name()])[0].strip()))
    return names


def report_orphans() -> list[str]:
    """One warning per earlier instance whose driver is dead but whose Ray processes live.

    Markers of dead drivers with nothing left are removed; the others stay, so every run
    says so until someone ends the processes.
    """
    messages = []
    for path in sorted(marker_dir().glob("*.json")):
        marker = DriverMarker.load(path)
        if marker is None or marker.is_driver_alive():
            continue
        orphans = instance_processes(marker)
        if not orphans:
            path.unlink(missing_ok=True)
            continue
        pids = " ".join(str(p.pid) for p in orphans)
        messages.append(
            f"{len(orphans)} Ray process(es) of a killed run (driver pid {marker.driver_pid}, tag {marker.tag}) "
            f"are still running and hold memory: {_names(orphans)}; end them with: kill -9 {pids}"
        )
    return messages


class Watchdog:
    """The driver's side: a marker, a watchdog process, and the tag ``ray.init`` runs with."""

    def __init__(self) -> None:
        me = psutil.Process()
        self.marker = DriverMarker(uuid.uuid4().hex, me.pid, me.create_time())
        self.marker.save()
        # Own session: a signal to the driver's process group (Ctrl-C, kill -- -PGID) spares it.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.ray_watchdog", str(self.marker.path)],
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != TAG_ENV},
        )

    @contextlib.contextmanager
    def tagged_environment(self) -> Iterator[None]:
        """The driver's environment carries the tag while Ray starts its processes."""
        os.environ[TAG_ENV] = self.marker.tag
        try:
            yield
        finally:
            del os.environ[TAG_ENV]

    def stop(self) -> None:
        """After ``ray.shutdown()``: tell the watchdog the exit was clean, remove the marker."""
        with contextlib.suppress(OSError):  # the watchdog may already be gone
            self._proc.stdin.write(DONE + "\n")
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self.marker.path.unlink(missing_ok=True)


def _descendants(pid: int) -> set[tuple[int, float]]:
    """(pid, start time) of every descendant of ``pid`` but this process."""
    found = set()
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.pid != os.getpid():
                    found.add((child.pid, child.create_time()))
    return found


def _driver_said(timeout_s: float) -> str | None:
    """The driver's next line: DONE, "" at end of file (it died), None when it said nothing yet."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout_s)
    return sys.stdin.readline().strip() if ready else None


def watch(marker_path: str) -> int:
    """The watchdog process: record the driver's descendants until it says ``done`` or dies."""
    marker = DriverMarker.load(Path(marker_path))
    if marker is None:
        return 1
    while (said := _driver_said(POLL_S)) is None:
        seen = _descendants(marker.driver_pid)
        if not seen <= set(marker.pids):
            marker = dataclasses.replace(marker, pids=tuple(sorted(seen | set(marker.pids))))
            marker.save()
    if said == DONE:
        return 0
    killed = kill_instance(marker)
    marker.path.unlink(missing_ok=True)
    print(f"ray_watchdog: the driver died; killed {len(killed)} Ray process(es) of its instance", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(watch(sys.argv[1]))
