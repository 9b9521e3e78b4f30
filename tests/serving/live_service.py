"""Helpers for the tests that deploy the ranking service on real Serve and call it over HTTP."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from components.config_loader import load_config
from pipelines.config import PipelineConfig
from tests.small_runs import lake_args

REQUEST_TS = 1_900_000_000  # after every event of the small lake: the whole history counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_sum(text: str, name: str) -> float:
    """The sum of a Prometheus counter or gauge over its labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@contextmanager
def deployed(small_lake: str, bundle_dir: str, *overrides: str, headers: dict | None = None) -> Iterator[httpx.Client]:
    """The demo preset's service on the small lake and bundle (plus ``overrides``), deployed on
    the session's Ray, ready; a client for it. Serve is shut down on exit."""
    from ray import serve

    from pipelines.serve import start

    args = [
        *lake_args(small_lake),
        f"--serve.bundle={bundle_dir}",
        f"--serve.port={free_port()}",
        "--serve.replica_cpus=0.25",
        "--serve.profile_batches=8",
        *overrides,
    ]
    url = start(load_config(PipelineConfig, "demo", args))
    try:
        with httpx.Client(base_url=url, timeout=30.0, headers=headers or {}) as client:
            deadline = time.time() + 300  # generous: a loaded machine starts Serve slowly
            while client.get("/readyz").status_code != 200:
                assert time.time() < deadline, "service never became ready"
                time.sleep(0.5)
            yield client
    finally:
        serve.shutdown()
