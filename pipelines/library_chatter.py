"""Library chatter with nothing for a user to act on, silenced at its source.

Imports only the standard library: ``ray_worker_setup.worker_setup`` runs this in every worker
process of an embedded Ray, and a worker that does not build a model (a Ray Data task, Serve's
proxy, Ray Train's controller) must not pay for importing torch to set a logger level.
"""

from __future__ import annotations

import logging
import warnings


class LibraryChatter(logging.Filter):
    """Drops what FBGEMM logs below WARNING through the ROOT logger (a bare ``logging.info``):
    each table batch's constructor logs its whole argument dict, multi-KB lines per table and
    per worker. On the root logger itself, so it holds even where something sets root to INFO
    (a worker, a bench, a user's own config); FBGEMM's warnings still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "fbgemm_gpu" not in record.pathname


def quiet_libraries() -> None:
    """Silence the chatter: in the driver (``pipelines.cli.configure_logging``) and in every worker
    of an embedded Ray (``pipelines.ray_worker_setup.worker_setup``). Idempotent."""
    root = logging.getLogger()
    if not any(isinstance(f, LibraryChatter) for f in root.filters):
        root.addFilter(LibraryChatter())
    # TorchRec's KeyedJaggedTensor asks torch.fx's is_fx_tracing() on every forward, and torch
    # warns once per process (~330 chars) that the function's meaning changed.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    # TorchRec's own deprecations, raised by its planner and DistributedModelParallel on every
    # sharding, of defaults it chooses itself (~350 chars each).
    for message in (r"HeuristicalStorageReservation is known to cause issues", r"`broadcast_buffers` is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
