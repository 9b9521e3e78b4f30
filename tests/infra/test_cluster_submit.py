"""The pipeline submitted unchanged to a real multi-process Ray cluster: ``ray start --head`` on
loopback plus one ``ray start --address`` worker node, token authentication on (the token
reaches every node and the submitting client through RAY_AUTH_MODE / RAY_AUTH_TOKEN, as Ray's
token-auth guide says), the tiny pipeline sent with ``ray job submit --working-dir . --runtime-env
infra/runtime-env.yaml`` through serve, a load test and the report; its outputs read back from
the lake, the checkpoint, the bundle and the report.
The cluster's processes are stopped by the PIDs this test started (never ``ray stop``, which
would stop every Ray on the machine)."""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.small_runs import TINY_MODEL, lake_args

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_processes(marker: str) -> list[psutil.Process]:
    """Processes of the cluster whose session lives under ``marker`` (its temp dir), with their
    descendants (the workers' command lines do not name the folder)."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(process.info["cmdline"] or ()):
                found[process.pid] = process
                for child in process.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    return list(found.values())


def _stop(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    # What has not exited 2 s after SIGTERM is killed: the test's own throwaway cluster, nothing to drain.
    _, alive = psutil.wait_procs(processes, timeout=2)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


# A job that prints nothing for this long is hung. No bound on the whole run: on a loaded machine
# the job's driver (its own session, so its own scheduling group) was seen getting 1-2 % of a
# core beside two busy loops, and the run took over 30 minutes while printing every stage.
STALL_S = 900


def _submit(submit: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``ray job submit`` (which streams the job's log) to its end; (exit code, output).
    Fails when the output stalls for STALL_S, killing the client (the cluster fixture stops the job)."""
    client = subprocess.Popen(submit, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in client.stdout:
            lines.put(line)
        lines.put(None)  # the client ended

    threading.Thread(target=read, daemon=True).start()
    out = []
    try:
        while (line := lines.get(timeout=STALL_S)) is not None:
            out.append(line)
    except queue.Empty:
        pytest.fail(f"the job printed nothing for {STALL_S} s: hung? Its output so far:\n{''.join(out)[-4000:]}")
    finally:
        if client.poll() is None:
            client.kill()
    return client.wait(), "".join(out)


@pytest.fixture
def cluster():
    """A head and one worker node on 127.0.0.1; yields (dashboard URL, environment for clients)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="urc-", dir="/tmp"))  # Ray's socket paths must stay < 108 bytes
    port, dashboard = _free_port(), _free_port()
    env = {
        **os.environ,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    head = [
        *ray,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        # Every node's dashboard agent (it runs submitted jobs) listens on 52365 by default: the
        # test session's own Ray and the other node on this host hold that port.
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    worker = [
        *ray,
        "start",
        f"--address=127.0.0.1:{port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    try:
        for command in (head, worker):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop(_cluster_processes(str(temp_dir)))
        leftovers = _cluster_processes(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not leftovers, "the cluster left processes behind"


def test_the_pipeline_runs_unchanged_on_a_two_node_cluster(cluster, tmp_path):
    from components.bundle import load_bundle
    from components.lake import open_table, table_uri

    address, env = cluster
    work = tmp_path / "work"  # absolute: the job runs in an uploaded copy of the working directory
    args = [
        "--config",
        "demo",
        *lake_args(str(work / "lake")),
        *TINY_MODEL,
        "--features.max_seq_len=64",
        "--model.variant=tokenmixer_large",
        f"--train.storage_path={work / 'checkpoints'}",
        "--train.num_workers=1",  # a real Ray Train worker, on whichever node has room
        "--train.batch_size=8",
        "--train.max_seq_len=32",
        "--train.max_epochs=1",
        "--train.max_steps=8",  # the cluster's path, not a model's quality: a few steps do
        f"--export.output={work / 'bundle'}",
        # serve, a short load test and the report, on the cluster too
        f"--serve.port={_free_port()}",
        "--serve.proxy_location=HeadOnly",  # both nodes share this host: one proxy per port
        "--serve.replica_cpus=0.25",
        "--serve.profile_batches=8",
        "--run.loadtest_rates=[4]",
        "--run.loadtest_duration_s=2",
        f"--run.reports_dir={work / 'reports'}",
        f"--run.wandb_dir={work}",
    ]
    submit = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "job",
        "submit",
        f"--address={address}",
        "--working-dir=.",
        "--runtime-env=infra/runtime-env.yaml",
        "--",
        "python",
        "-m",
        "pipelines.run",
        *args,
    ]
    for _ in range(10):
        returncode, log = _submit(submit, env)
        # Right after `ray start` the head may not have a job agent yet: the submission is
        # refused before anything runs, so sending it again is safe.
        if returncode == 0 or "No available agent to submit job" not in log:
            break
        time.sleep(3)
    assert returncode == 0 and "succeeded" in log, log[-4000:]
    for table in ("events", "sequences", "samples"):
        assert open_table(table_uri(str(work / "lake"), table)).version() >= 0
    metrics = list((work / "checkpoints").glob("*/metrics_test.json"))
    assert len(metrics) == 1 and "like_auc" in metrics[0].read_text()
    bundle = load_bundle(str(work / "bundle"))
    assert bundle.model_version in log  # the job's own report names the bundle it wrote
    # The run's report, in the folder the preset names (not the job's deleted working copy).
    (report,) = (work / "reports").glob("*/report.md")
    assert f"report: {report}" in log
    text = report.read_text()
    assert "## Load test" in text and bundle.model_version in text
    assert str(work / "lake") in text and "samples v0" in text
    assert (report.parent / "latency_cdf.png").is_file()
