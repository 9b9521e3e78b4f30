"""No orphans: a SIGKILLed features driver takes its embedded Ray with it (real subprocesses).

Before pipelines/ray_watchdog.py, Ray's dashboard agent and runtime-env agent of a killed
driver stayed alive for good (and ignored SIGTERM); see that module for why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipelines.bench_data import synthetic_lake
from pipelines.ray_watchdog import TAG_ENV, DriverMarker, kill_instance, marker_dir, report_orphans

REPO = Path(__file__).resolve().parents[2]
# The features CLI, stopped for good once Ray is up and its inputs are pinned (then killed).
STOPPED_FEATURES = r"""
import sys, time
import pipelines.features as features
def stop_forever(*args, **kwargs):
    open(sys.argv[1], "w").close()
    while True:
        time.sleep(1)
features.global_stats = stop_forever
sys.exit(features.main(sys.argv[2:]))
"""
AGENTS = ("DashboardAgent", "RuntimeEnvAgent")
ORPHAN_DEADLINE_S = 120.0  # the watchdog kills within a second when idle; generous for a loaded machine


def _cmdline(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline()).strip()
    return ""


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _start_stopped_driver(folder: Path) -> tuple[subprocess.Popen, Path]:
    root = str(folder / "lake")
    synthetic_lake(root, num_events=2000, num_buckets=2)
    ready = folder / "ready"
    args = [f"--lake.root={root}", "--ray.num_cpus=2", "--ray.enable_progress_bars=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(
        [sys.executable, "-c", STOPPED_FEATURES, str(ready), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return driver, ready


@pytest.fixture(scope="module")
def stopped_drivers(tmp_path_factory):
    """Two stopped drivers, started side by side (each is seconds of imports and a Ray start), as
    [(driver Popen, its descendants once both Ray agents run)]; every process killed at the end."""
    started = [_start_stopped_driver(tmp_path_factory.mktemp("driver")) for _ in range(2)]
    seen: list[dict[int, psutil.Process]] = [{}, {}]
    try:
        deadline = time.monotonic() + 300
        for (driver, ready), procs in zip(started, seen, strict=True):
            while not (ready.exists() and all(any(a in _cmdline(p) for p in procs.values()) for a in AGENTS)):
                assert driver.poll() is None, driver.stderr.read()
                assert time.monotonic() < deadline, "Ray's agents did not start"
                with contextlib.suppress(psutil.Error):
                    procs.update({p.pid: p for p in psutil.Process(driver.pid).children(recursive=True)})
                time.sleep(0.1)
        yield [(driver, list(procs.values())) for (driver, _), procs in zip(started, seen, strict=True)]
    finally:
        for (driver, _), procs in zip(started, seen, strict=True):
            for proc in [psutil.Process(driver.pid), *procs.values()] if driver.poll() is None else procs.values():
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            driver.wait()


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(procs)


def test_sigkilled_driver_leaves_no_ray_process_behind(stopped_drivers):
    driver, descendants = stopped_drivers[0]
    ray_procs = [p for p in descendants if "ray_watchdog" not in _cmdline(p)]
    started = time.monotonic()
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    survivors = _wait_gone(ray_procs, ORPHAN_DEADLINE_S)
    assert not survivors, f"orphans after {ORPHAN_DEADLINE_S} s: {[(p.pid, _cmdline(p)) for p in survivors]}"
    print(f"all {len(ray_procs)} Ray processes gone {time.monotonic() - started:.1f} s after the kill")


def test_orphans_of_a_run_whose_watchdog_died_too_are_reported_by_the_next_run(stopped_drivers):
    driver, descendants = stopped_drivers[1]
    watchdog = next(p for p in descendants if "ray_watchdog" in _cmdline(p))
    tag = next(p.environ()[TAG_ENV] for p in descendants if "raylet" in _cmdline(p))  # raylet keeps its title
    watchdog.kill()  # stays a zombie of the stopped driver: not waited for
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(1.0)  # what dies with the driver (GCS, raylet) is gone by now
    ours = [m for m in report_orphans() if f"driver pid {driver.pid}," in m]
    assert len(ours) == 1 and "RuntimeEnvAgent" in ours[0] and "kill -9" in ours[0], ours
    assert kill_instance(DriverMarker.load(marker_dir() / f"{tag}.json"))  # what the watchdog would have done
    assert not _wait_gone([p for p in descendants if p.pid != watchdog.pid], 10)
    assert not [m for m in report_orphans() if f"driver pid {driver.pid}," in m]
    assert not (marker_dir() / f"{tag}.json").exists()  # cleaned up once nothing is left
