"""Starting and stopping Ray for a pipeline entry point: embedded by default, a cluster when asked.

An already-initialised Ray (tests, ``pipelines.run`` chaining stages, a Ray job driver)
is reused and left running: only the caller that started Ray shuts it down.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from pipelines.config import RayConfig

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_runtime(config: RayConfig) -> Iterator[None]:
    """Context in which Ray is initialised according to ``config``."""
    import ray
    from ray.data import DataContext

    # W&B runs offline unless a key is present; set before init so workers inherit it.
    os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
    started = False
    if not ray.is_initialized():
        address = config.address or os.environ.get("RAY_ADDRESS")
        if address:
            # Joining a cluster: never pass num_cpus (STACK.md).
            logger.info("connecting to Ray at %s", address)
            ray.init(address=address, log_to_driver=True)
        else:
            # address="local": a stale cluster file must not make us join a dead head.
            logger.info("starting embedded Ray with %d logical CPUs", config.num_cpus)
            ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False)
        started = True
    DataContext.get_current().enable_progress_bars = config.enable_progress_bars
    try:
        yield
    finally:
        if started:
            ray.shutdown()
