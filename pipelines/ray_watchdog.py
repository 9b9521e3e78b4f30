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
- a clean exit writes ``done`` to the pipe. End of file without it means the driver died:
  the watchdog SIGKILLs every process carrying the tag (within a second) and removes the marker.
If the watchdog itself was killed too, the next run finds the marker of a dead driver whose
tagged processes still live and reports them (:func:`report_orphans`).

    python -m pipelines.ray_watchdog TAG     (started by :class:`Watchdog`, reads stdin)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

TAG_ENV = "ULTRARANK_RAY_OWNER"
DONE = "done"
KILL_ROUNDS = 5
_HAS_PROCFS = os.path.isdir("/proc/self")


def marker_dir() -> Path:
    """Where running embedded instances leave their markers (per user, in the temp dir)."""
    return Path(tempfile.gettempdir()) / f"ultrarank-ray-{os.getuid()}"


@dataclass(frozen=True)
class DriverMarker:
    """One embedded Ray instance: its tag and the driver that owns it (pid + start time, so
    a reused pid is not mistaken for the driver)."""

    tag: str
    driver_pid: int
    driver_started: float

    @property
    def path(self) -> Path:
        return marker_dir() / f"{self.tag}.json"

    def is_driver_alive(self) -> bool:
        try:
            return psutil.Process(self.driver_pid).create_time() == self.driver_started
        except psutil.Error:
            return False


def _has_tag(proc: psutil.Process, tag: str) -> bool:
    """Whether the process's environment holds ``TAG_ENV=tag``.

    Read from /proc/<pid>/environ entry by entry: Ray's process titles (setproctitle) zero the
    start of that block, and psutil's ``environ()`` stops at the first empty entry, so it
    returns nothing for exactly the agents that outlive a killed driver.
    """
    if not _HAS_PROCFS:  # macOS: psutil's view
        return proc.environ().get(TAG_ENV) == tag
    try:
        with open(f"/proc/{proc.pid}/environ", "rb") as block:
            return f"{TAG_ENV}={tag}".encode() in block.read().split(b"\0")
    except OSError:  # gone, a kernel thread, or another user's process
        return False


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment carries ``TAG_ENV=tag``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and _has_tag(proc, tag) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:  # gone, or another user's process
            continue
    return found


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process of the instance ``tag``; returns their pids."""
    killed = []
    for proc in tagged_processes(tag):
        with contextlib.suppress(psutil.Error):
            proc.kill()
            killed.append(proc.pid)
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

    Markers of dead drivers with nothing left are removed; live ones are kept until reported
    processes are gone, so every run says so until someone ends them.
    """
    messages = []
    for path in sorted(marker_dir().glob("*.json")):
        try:
            marker = DriverMarker(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if marker.is_driver_alive():
            continue
        orphans = tagged_processes(marker.tag)
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
        self.marker.path.parent.mkdir(parents=True, exist_ok=True)
        self.marker.path.write_text(json.dumps(asdict(self.marker)))
        # Own session: a signal to the driver's process group (Ctrl-C, kill -- -PGID) spares it.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.ray_watchdog", self.marker.tag],
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


def watch(tag: str) -> int:
    """The watchdog process: wait for the driver's ``done`` or its death (end of stdin)."""
    if sys.stdin.readline().strip() == DONE:
        return 0
    killed: list[int] = []
    for _ in range(KILL_ROUNDS):  # a process forked while the last round ran is caught by the next
        round_killed = kill_tagged(tag)
        if not round_killed:
            break
        killed += round_killed
        time.sleep(0.2)
    (marker_dir() / f"{tag}.json").unlink(missing_ok=True)
    print(f"ray_watchdog: the driver died; killed {len(killed)} Ray process(es) of its instance", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(watch(sys.argv[1]))
