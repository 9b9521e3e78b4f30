"""Starting and stopping Ray for a pipeline entry point: embedded by default, a cluster when asked.

An already-initialised Ray (tests, ``pipelines.run`` chaining stages, a Ray job driver)
is reused and left running: only the caller that started Ray shuts it down. An embedded
instance shares the driver's fate (pipelines/ray_watchdog.py): a killed driver's Ray
processes are killed by a watchdog, and leftovers of earlier killed runs are reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

from pipelines.config import RayConfig
from pipelines.ray_console import install_console_filter
from pipelines.ray_watchdog import Watchdog, report_orphans
from pipelines.ray_worker_setup import worker_setup
from serving.proxy_limits import proxy_environment

logger = logging.getLogger(__name__)


def progress_bars_on(config: RayConfig, stream: TextIO) -> bool:
    """Ray Data's progress bars where ``stream`` (the driver's stderr) is a terminal, if the config
    wants them. In a log file, a pipe or CI every redraw is carriage returns and cursor-up codes
    on one line: a MovieLens ``make demo > log`` had 15 lines of 300-1148 characters of them."""
    return config.enable_progress_bars and stream.isatty()


@contextlib.contextmanager
def keeping_sigterm_handler() -> Iterator[None]:
    """Put back the entry point's own SIGTERM handler after ``ray.init``, which installs a
    handler that aborts the driver: the entry point's clean shutdown (Serve drained, Ray
    stopped) would never run, and the watchdog would report a dead driver."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_runtime(config: RayConfig) -> Iterator[None]:
    """Context in which Ray is initialised according to ``config``."""
    import ray
    from ray.data import DataContext

    # W&B runs offline unless a key is present; set before init so workers inherit it.
    os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
    started, watchdog = False, None
    if not ray.is_initialized():
        address = config.address or os.environ.get("RAY_ADDRESS")
        with keeping_sigterm_handler():
            if address:
                # Joining a cluster: never pass num_cpus (STACK.md).
                logger.info("connecting to Ray at %s", address)
                ray.init(address=address, log_to_driver=True)
            else:
                watchdog = start_embedded(config)
        started = True
        install_console_filter()  # this driver prints its workers' output: without library noise
    DataContext.get_current().enable_progress_bars = progress_bars_on(config, sys.stderr)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
        if watchdog is not None:
            watchdog.stop()


def start_embedded(config: RayConfig) -> Watchdog:
    """``ray.init`` of an embedded instance whose processes die with this driver (ray_watchdog)."""
    import ray

    try:
        for message in report_orphans():
            logger.warning(message)
    except Exception as exc:  # a report must never stop a run
        logger.warning("could not check for Ray processes left by killed runs: %s", exc)
    watchdog = Watchdog()
    # Serve's HTTP proxy takes its body ceiling (and its health-check patience) from the environment
    # of the workers Ray starts now.
    for name, value in proxy_environment().items():
        os.environ.setdefault(name, value)
    # address="local": a stale cluster file must not make us join a dead head.
    logger.info("starting embedded Ray with %d logical CPUs", config.num_cpus)
    try:
        with watchdog.tagged_environment():
            ray.init(
                address="local",
                num_cpus=config.num_cpus,
                # Ray Train's PlacementGroupCleaner (an actor of every training run) polls the state
                # API, which the dashboard serves: without it the cleaner logs a failure every second
                # (a traceback when several Ray instances run on the machine) and could never clean.
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                runtime_env={"worker_process_setup_hook": f"{worker_setup.__module__}.{worker_setup.__name__}"},
            )
    except BaseException:
        ray.shutdown()
        watchdog.stop()
        raise
    return watchdog
