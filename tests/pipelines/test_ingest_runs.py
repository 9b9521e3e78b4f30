"""One ingest run = one consistent lake: a killed ingest and an ingest overlapping features
end in a consistent lake or a clear error, never in mixed vocabularies (real subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from components import lake
from components.ingest_runs import RUN_ID_KEY, pin_ingest
from components.lake import LakeConfig
from pipelines import features
from pipelines.config import FeaturesConfig, PipelineConfig
from pipelines.ingest import main as ingest_main

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
# Runs the ingest CLI in this process, hanging for ever after the Nth Delta commit (to be killed).
HANG_AFTER_COMMIT = r"""
import sys, time
import deltalake
hang_after, ready = int(sys.argv[1]), sys.argv[2]
real, commits = deltalake.write_deltalake, []
def write_then_maybe_hang(*args, **kwargs):
    real(*args, **kwargs)
    commits.append(1)
    if len(commits) == hang_after:
        open(ready, "w").close()
        while True:
            time.sleep(1)
deltalake.write_deltalake = write_then_maybe_hang
from pipelines.ingest import main
sys.exit(main(sys.argv[3:]))
"""


def event_log(path: Path, first_user: int, first_item: int) -> Path:
    """8 users x 12 events, one event per hour (every event its own session); ids from first_*.

    A log with lower first ids shifts every vocabulary index: mixing two runs shows up."""
    rows = [
        f"{first_user + u},{first_item + (u * 5 + e) % 12},{1_600_000_000 + 3600 * (e * 8 + u)},{1 + (u + e) % 5}"
        for u in range(8)
        for e in range(12)
    ]
    path.write_text("user_id,item_id,timestamp,value\n" + "\n".join(rows) + "\n")
    return path


def ingest_args(root: Path, log: Path) -> list[str]:
    return [f"--lake.root={root}", "--lake.num_buckets=2", "--ingest.source=events", f"--ingest.events.path={log}"]


def features_config(root: Path) -> PipelineConfig:
    return PipelineConfig(
        lake=LakeConfig(root=str(root), num_buckets=2),
        features=FeaturesConfig(candidates_per_group=4, max_positives_per_group=2),
    )


def assert_one_vocabulary(root: Path) -> None:
    """samples/sequences were built from ONE ingest run, recorded in the samples commit."""
    info = lake.commit_metadata(lake.table_uri(str(root), "samples"))
    versions = {t: int(info[f"{t}_version"]) for t in ("items", "users", "events")}
    for table, version in versions.items():
        uri = lake.table_uri(str(root), table)
        assert lake.commit_metadata(uri, version)[RUN_ID_KEY] == info[RUN_ID_KEY], table
    items = lake.read_table(lake.table_uri(str(root), "items"), version=versions["items"])
    users = lake.read_table(lake.table_uri(str(root), "users"), version=versions["users"])
    events = lake.read_table(lake.table_uri(str(root), "events"), version=versions["events"])
    item_idx = dict(zip(items["item_id"].to_pylist(), items["item_idx"].to_pylist()))
    user_idx = dict(zip(users["user_id"].to_pylist(), users["user_idx"].to_pylist()))
    sequences = lake.read_table(lake.table_uri(str(root), "sequences"))
    for user, seq in zip(sequences["user_id"].to_pylist(), sequences["item_idx"].to_pylist()):
        mine = events.filter(pc.equal(events["user_id"], user))
        assert sorted(seq) == sorted(item_idx[i] for i in mine["item_id"].to_pylist())
    samples = lake.read_table(lake.table_uri(str(root), "samples"))
    assert samples.num_rows > 0
    assert samples["user_idx"].to_pylist() == [user_idx[u] for u in samples["user_id"].to_pylist()]


def test_killed_ingest_between_commits_is_refused_then_repaired(ray_session, tmp_path, capsys):
    root = tmp_path / "lake"
    assert ingest_main(ingest_args(root, event_log(tmp_path / "r1.csv", 10, 100))) == 0
    ready = tmp_path / "ready"
    args = ingest_args(root, event_log(tmp_path / "r2.csv", 1, 1))
    script = [sys.executable, "-c", HANG_AFTER_COMMIT, "1", str(ready), *args]
    proc = subprocess.Popen(script, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # items of run 2 committed, users and events still run 1's
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(lake.LakeError, match="latest ingest run is incomplete.*Re-run ingest"):
        pin_ingest(str(root))
    assert features.main([f"--lake.root={root}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("features: failed: the lake's latest ingest run is incomplete") and "items v1" in err
    assert lake.table_version(lake.table_uri(str(root), "samples")) is None  # nothing committed
    assert ingest_main(args) == 0  # re-running the ingest repairs the lake
    features.run_features(features_config(root))
    assert_one_vocabulary(root)


def test_features_started_before_an_ingest_reads_the_triple_it_pinned(ray_session, tmp_path, monkeypatch):
    root = tmp_path / "lake"
    assert ingest_main(ingest_args(root, event_log(tmp_path / "r1.csv", 10, 100))) == 0
    run_1 = lake.commit_metadata(lake.table_uri(str(root), "events"))[RUN_ID_KEY]
    real_stats = features.global_stats

    def ingest_then_stats(*args, **kwargs):  # features has pinned its inputs: a full ingest lands now
        cmd = [sys.executable, "-m", "pipelines.ingest", *ingest_args(root, event_log(tmp_path / "r2.csv", 1, 1))]
        done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return real_stats(*args, **kwargs)

    monkeypatch.setattr(features, "global_stats", ingest_then_stats)
    features.run_features(features_config(root))
    assert lake.commit_metadata(lake.table_uri(str(root), "samples"))[RUN_ID_KEY] == run_1
    assert_one_vocabulary(root)
    latest = lake.commit_metadata(lake.table_uri(str(root), "items"))[RUN_ID_KEY]
    assert latest != run_1 and pin_ingest(str(root)).run_id == latest  # the next run reads run 2
    assert np.all(lake.read_table(lake.table_uri(str(root), "samples"))["user_idx"].to_numpy() >= 2)
