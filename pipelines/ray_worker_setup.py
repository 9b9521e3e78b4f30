"""The ``worker_process_setup_hook`` of the embedded Ray (``pipelines.ray_runtime``).

It runs in every worker process the instance starts, so it imports nothing heavy: importing
``pipelines.cli`` here (which imports the configs, and through them torch and TorchRec) cost
each Ray Data task, Serve proxy and Train controller ~4.5 s of CPU it had no use for.
"""

from __future__ import annotations

import os

from pipelines.library_chatter import quiet_libraries


def worker_setup() -> None:
    """Gives the worker this instance's address as RAY_ADDRESS: a library inside a worker that
    looks Ray up by itself (the state API of Ray Train's PlacementGroupCleaner) otherwise scans
    the machine and, when another Ray instance runs there (a test session, a second pipeline,
    a local cluster), fails with "Found multiple active Ray instances" and a traceback. Also
    silences the library chatter the driver silences (``pipelines.library_chatter``)."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    quiet_libraries()
