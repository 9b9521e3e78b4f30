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
# Ray nices its workers to 15. On a machine whose cores are busy at nice 0 (a loaded CI runner,
# a laptop compiling) such a worker gets ~3% of a core (CFS weights 36 vs 1024): a Ray Data
# test took 290 s instead of 8 under two busy loops, and the cluster test ran past its 10-minute
# limit. What the suite checks does not depend on priority, so every Ray it starts (the
# session's, the pipelines' embedded ones, the cluster test's nodes: all inherit this
# environment) runs its workers at the priority of the load beside them.
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.fixture(scope="session")
def ray_session():
    """Real local Ray (4 logical CPUs so Ray Data never starves beside train workers)."""
    import ray
    from ray.data import DataContext

    from serving.proxy_limits import proxy_environment

    for name, value in proxy_environment().items():  # Serve's proxy body ceiling and patience (as ray_runtime)
        os.environ.setdefault(name, value)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_lake(ray_session, tmp_path_factory) -> str:
    """Root of a real lake (ingest + features on ~4000 synthetic events), built once."""
    from components.config_loader import load_config
    from pipelines.config import PipelineConfig
    from pipelines.features import run_features
    from pipelines.ingest import run_ingest
    from tests.small_runs import lake_args

    root = str(tmp_path_factory.mktemp("train_lake") / "lake")
    config = load_config(PipelineConfig, "demo", lake_args(root))
    run_ingest(config)
    run_features(config)
    return root


@pytest.fixture(scope="session")
def trained(small_lake, tmp_path_factory) -> tuple[str, str]:
    """One in-process training run of one epoch on the small lake; (storage, checkpoint path)."""
    from components.checkpoint import latest_checkpoint
    from pipelines.train import main
    from tests.small_runs import train_args

    storage = str(tmp_path_factory.mktemp("storage"))
    assert main(train_args(small_lake, storage, "--train.run_name=base")) == 0
    found = latest_checkpoint(f"{storage}/base")
    assert found is not None
    return storage, found[0]
