"""The tiny whole run that tests/pipelines/test_run.py checks, as ``make demo --keep-serving``
runs it: a fresh process with its own embedded Ray (beside the session's: two instances on the
machine), training on a real Ray Train worker, serving after the report until SIGTERM.

It is a separate process that needs nothing from the session, so tests/conftest.py starts it
when the session starts and the tests read it when they come to it: its ~90 s of process
starts and imports then overlap the many single-threaded tests, which leave a core idle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.small_runs import TINY_MODEL

READY_LINE = "Ctrl-C (or SIGTERM) stops it."
DEADLINE_S = 1800  # generous: a loaded machine


def run_args(tmp: Path, port: int) -> list[str]:
    """The demo preset on a small synthetic lake under ``tmp``, serving on ``port``."""
    return [
        "--config",
        "demo",
        f"--lake.root={tmp / 'lake'}",
        "--lake.num_buckets=2",
        "--ingest.source=synthetic",
        "--ingest.synthetic.num_events=3000",
        "--ingest.synthetic.num_users=40",
        "--ingest.synthetic.num_items=300",
        "--ingest.synthetic.max_history=600",
        "--features.max_seq_len=50",
        "--ray.enable_progress_bars=false",
        *TINY_MODEL,
        "--train.num_workers=0",
        "--train.max_steps=4",
        "--train.batch_size=4",
        "--train.max_seq_len=32",
        "--train.log_every_steps=2",
        f"--train.storage_path={tmp / 'ckpt'}",
        f"--export.output={tmp / 'bundle'}",
        f"--serve.port={port}",
        "--serve.replica_cpus=0.25",
        "--serve.profile_batches=8",
        f"--run.reports_dir={tmp / 'reports'}",
        "--run.loadtest_rates=[4,8]",
        "--run.loadtest_duration_s=2",
    ]


@dataclass(frozen=True)
class DemoRunResult:
    folder: Path
    args: list[str]
    log: str  # stdout and stderr as one
    ready: dict  # /readyz while it served ({} if it never served)
    port: int
    returncode: int


class DemoRun:
    """The run, started now; ``result()`` waits for it to serve, asks /readyz, stops it with
    SIGTERM and returns what it printed. Each output line is read as it comes (a full pipe would
    stall the run)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.args = [*run_args(folder, port), "--train.num_workers=1"]
        env = {**os.environ, "WANDB_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        self._child = subprocess.Popen(
            [sys.executable, "-m", "pipelines.run", *self.args, "--keep-serving"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._lines: list[str] = []
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read, name="demo-run-output", daemon=True)
        self._reader.start()
        self._result: DemoRunResult | None = None

    def _read(self) -> None:
        for line in self._child.stdout:
            self._lines.append(line)
            if READY_LINE in line:
                self._serving.set()
        self._serving.set()  # it ended without serving: nothing more to wait for

    def result(self) -> DemoRunResult:
        """The finished run (the first call waits for it and stops it; later calls return the same)."""
        if self._result is None:
            self._serving.wait(timeout=DEADLINE_S)
            ready = {}
            if self._child.poll() is None and any(f"at http://127.0.0.1:{self.port}" in x for x in self._lines):
                ready = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=30).json()
            self.stop()
            self._result = DemoRunResult(
                self.folder, self.args, "".join(self._lines), ready, self.port, self._child.returncode
            )
        return self._result

    def stop(self) -> None:
        """SIGTERM (the run's clean stop), then SIGKILL if it has not ended within 300 s."""
        if self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)
            try:
                self._child.wait(timeout=300)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        self._reader.join(timeout=60)
