"""Shared fixtures: ONE real local Ray instance for the whole session (STACK.md)."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

os.environ.setdefault("WANDB_MODE", "disabled")
# CI runs the same examples every time (no flaky new counter-examples on a submission);
# locally hypothesis keeps exploring.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """Real local Ray (4 logical CPUs so Ray Data never starves beside train workers)."""
    import ray
    from ray.data import DataContext

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
