"""Delta helpers: round trips, versions, log-only statistics, and crash/concurrency safety
with real subprocesses writing real Delta tables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.lake import (
    EVENTS_SCHEMA,
    ITEMS_SCHEMA,
    LakeError,
    commit_metadata,
    events_table,
    find_version,
    items_table,
    read_table,
    table_version,
    user_bucket,
    users_table,
    write_table,
)
from components.lake_files import commit_files_overwrite, write_data_file
from components.lake_stats import column_range, events_time_range, row_count

REPO = Path(__file__).resolve().parents[2]


def tiny_events(n: int = 200, seed: int = 0, num_buckets: int = 4) -> pa.Table:
    rng = np.random.default_rng(seed)
    return events_table(
        rng.integers(0, 50, n),
        rng.integers(0, 30, n),
        rng.integers(1_500_000_000, 1_600_000_000, n),
        rng.integers(1, 11, n) / 2.0,
        num_buckets,
    )


def test_user_bucket_is_stable_and_in_range():
    ids = np.arange(-5, 1000)
    buckets = user_bucket(ids, 8)
    assert buckets.dtype == np.int32 and buckets.min() >= 0 and buckets.max() < 8
    assert np.array_equal(buckets, user_bucket(ids.copy(), 8))
    assert len(np.unique(buckets)) == 8
    with pytest.raises(ValueError, match="num_buckets"):
        user_bucket(ids, 0)


def test_events_table_schema_sort_and_buckets():
    table = tiny_events()
    assert table.schema == EVENTS_SCHEMA
    keys = np.stack([table[c].to_numpy() for c in ("bucket", "user_id", "ts", "item_id")])
    order = np.lexsort(keys[::-1])
    assert np.array_equal(order, np.arange(table.num_rows))
    assert np.array_equal(table["bucket"].to_numpy(), user_bucket(table["user_id"].to_numpy(), 4))


def test_items_and_users_vocabularies():
    items = items_table(
        np.array([30, 10, 20]), np.array([1, 2, 4]), np.array([1999, 0, 2001]), [[2], [], [3, 4]], ["c", None, "b"]
    )
    assert items.schema == ITEMS_SCHEMA
    assert items["item_id"].to_pylist() == [10, 20, 30]
    assert items["item_idx"].to_pylist() == [2, 3, 4]  # 0 pad, 1 OOV
    assert items["tag_ids"].to_pylist() == [[], [3, 4], [2]]
    assert items["title"].to_pylist() == [None, "b", "c"]
    with pytest.raises(ValueError, match="duplicate item_id 7"):
        items_table(np.array([7, 7]), np.zeros(2), np.zeros(2), [[], []])
    users = users_table(np.array([5, 3, 5, 9]))
    assert users["user_id"].to_pylist() == [3, 5, 9]
    assert users["user_idx"].to_pylist() == [2, 3, 4]


def test_write_read_versions_and_time_travel(tmp_path):
    uri = str(tmp_path / "events")
    assert table_version(uri) is None
    first, second = tiny_events(seed=0), tiny_events(n=120, seed=1)
    assert write_table(uri, first, partition_by=["bucket"]) == 0
    assert write_table(uri, second, partition_by=["bucket"]) == 1
    assert table_version(uri) == 1
    sort = [("bucket", "ascending"), ("user_id", "ascending"), ("ts", "ascending"), ("item_id", "ascending")]
    assert read_table(uri).sort_by(sort).equals(second)
    assert read_table(uri, version=0).sort_by(sort).equals(first)
    assert read_table(uri, columns=["ts"]).column_names == ["ts"]
    only = read_table(uri, filters=pc.field("bucket") == 1)
    assert set(only["bucket"].to_pylist()) <= {1}
    assert row_count(uri) == 120 and row_count(uri, version=0) == 200


def test_log_statistics_give_time_range_without_reading_data(tmp_path):
    uri = str(tmp_path / "events")
    table = tiny_events(n=500)
    write_table(uri, table, partition_by=["bucket"])
    ts = table["ts"].to_numpy()
    assert events_time_range(uri) == (int(ts.min()), int(ts.max()))
    # Data files gone: the range must still come from the log alone.
    for parquet in Path(uri).rglob("*.parquet"):
        parquet.unlink()
    assert events_time_range(uri) == (int(ts.min()), int(ts.max()))
    assert column_range(uri, "user_id") == (
        int(table["user_id"].to_numpy().min()),
        int(table["user_id"].to_numpy().max()),
    )


def test_commit_metadata_and_missing_table_errors(tmp_path):
    uri = str(tmp_path / "items")
    write_table(uri, pa.table({"a": [1]}), custom_metadata={"genres": "A|B"})
    assert commit_metadata(uri)["genres"] == "A|B"
    with pytest.raises(LakeError, match="no Delta table at .*nothing"):
        read_table(str(tmp_path / "nothing"))
    with pytest.raises(LakeError, match="version 7"):
        read_table(uri, version=7)


def test_commit_files_overwrite_records_metadata_and_find_version(tmp_path):
    uri = str(tmp_path / "t")
    schema = pa.schema([("x", pa.int64()), ("part", pa.string())])
    for i, job in enumerate(["a", "b", "a", "c"]):
        part = write_data_file(pa.table({"x": [i], "part": ["p"]}, schema=schema), uri, {"part": "p"}, f"f{i}")
        assert commit_files_overwrite(uri, schema, ["part"], [part], custom_metadata={"job_id": job}) == i
    assert commit_metadata(uri, 1)["job_id"] == "b" and commit_metadata(uri)["job_id"] == "c"
    assert find_version(uri, "job_id", "a") == 2  # the newest matching commit
    assert find_version(uri, "job_id", "a", max_version=1) == 0
    assert find_version(uri, "job_id", "zzz") is None
    part = write_data_file(pa.table({"x": [9], "part": ["p"]}, schema=schema), uri, {"part": "p"}, "f9")
    assert commit_files_overwrite(uri, schema, ["part"], [part]) == 4  # metadata stays optional
    assert "job_id" not in commit_metadata(uri)
    assert read_table(uri)["x"].to_pylist() == [9]


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=50), st.integers(1, 64))
def test_user_bucket_property(ids, num_buckets):
    buckets = user_bucket(np.array(ids, dtype=np.int64), num_buckets)
    assert ((buckets >= 0) & (buckets < num_buckets)).all()


# ---------------------------------------------------------------- crash and concurrency

WRITER = r"""
import os, sys, time
import numpy as np, pyarrow as pa
import components.lake_files as lake_files
from components.lake import LakeWriteError, write_table
uri, tag, mode, sync = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
schema = pa.schema([("x", pa.int64()), ("tag", pa.int64())])
def pause():  # signal and wait (or hang forever)
    open(f"{sync}.ready{tag}", "w").close()
    while not os.path.exists(f"{sync}.go"):
        time.sleep(0.01)
def batches(pause_at=3):
    for i in range(6):
        if i == pause_at:  # files of batches 0..2 are on disk now
            pause()
        yield pa.record_batch([pa.array(np.arange(i * 20_000, (i + 1) * 20_000)),
                               pa.array(np.full(20_000, tag))], schema=schema)
def write_files():  # the features job's path: worker-written files, one driver commit
    parts = [write_data_file(pa.Table.from_batches([b]), uri, {}, f"tag{tag}-{i}")
             for i, b in enumerate(batches(pause_at=None))]
    real_version = lake_files.table_version
    def version_then_pause(*args):  # pause between "is there a table?" and the commit
        lake_files.table_version = real_version
        version = real_version(*args)
        pause()
        return version
    lake_files.table_version = version_then_pause
    lake_files.commit_files_overwrite(uri, schema, [], parts)
write_data_file = lake_files.write_data_file
try:
    if mode == "files":
        write_files()
    else:
        write_table(uri, pa.RecordBatchReader.from_batches(schema, batches()), mode=mode,
                    target_file_size=50_000)
except LakeWriteError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""

ROWS_PER_WRITE = 6 * 20_000


def _start_writer(script: Path, uri: str, tag: int, mode: str, sync: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(script), uri, str(tag), mode, str(sync)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, what: str, procs=(), timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"writer exited early while waiting for {what}: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _seed_table(uri: str) -> pa.Table:
    base = pa.table({"x": pa.array(np.arange(10), pa.int64()), "tag": pa.array(np.zeros(10, np.int64))})
    write_table(uri, base, mode="overwrite")
    return base


@pytest.fixture
def writer_script(tmp_path) -> Path:
    path = tmp_path / "writer.py"
    path.write_text(WRITER)
    return path


def test_sigkill_mid_write_leaves_previous_version(tmp_path, writer_script):
    uri = str(tmp_path / "t")
    base = _seed_table(uri)
    committed = {Path(p).name for p in Path(uri).glob("*.parquet")}
    sync = tmp_path / "sync"
    proc = _start_writer(writer_script, uri, 1, "overwrite", sync)
    try:

        def new_files() -> set[str]:
            return {p.name for p in Path(uri).glob("*.parquet")} - committed

        _wait_for(lambda: Path(f"{sync}.ready1").exists() and new_files(), "data files", [proc])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert new_files(), "the kill must happen after data files appeared"
    assert table_version(uri) == 0
    assert read_table(uri).sort_by("x").equals(base)  # no partial rows visible
    # And the table still takes writes afterwards.
    assert write_table(uri, base, mode="append") == 1


def _race(writer_script, uri: str, mode: str, sync, when_ready=lambda: True) -> list[tuple[int, str]]:
    """Two writer subprocesses (tags 1, 2) prepared up to their commit, then released together.

    ``when_ready`` is asserted once both have written their files; returns (exit code, stderr) each.
    """
    procs = [_start_writer(writer_script, uri, tag, mode, sync) for tag in (1, 2)]
    try:
        _wait_for(lambda: all(Path(f"{sync}.ready{t}").exists() for t in (1, 2)), "both ready", procs)
        assert when_ready()
        Path(f"{sync}.go").touch()
        return [(p.wait(timeout=60), p.communicate()[1]) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("mode", ["overwrite", "append"])
def test_concurrent_writers_never_mix(tmp_path, writer_script, mode):
    uri = str(tmp_path / "t")
    base = _seed_table(uri)
    sync = tmp_path / "sync"
    # Both writers have read version 0 and written files before either commits.
    results = _race(writer_script, uri, mode, sync)
    codes = sorted(code for code, _ in results)
    final = read_table(uri)
    counts = dict(zip(*[c.to_pylist() for c in pc.value_counts(final["tag"]).flatten()]))
    if mode == "overwrite":
        # Delta rejects the second overwrite (its input was deleted underneath it).
        assert codes == [0, 3], results
        loser = next(err for code, err in results if code == 3)
        assert "failed, table unchanged" in loser and uri in loser
        winner = 1 + [code for code, _ in results].index(0)
        assert counts == {winner: ROWS_PER_WRITE}
        assert table_version(uri) == 1
    else:
        assert codes == [0, 0], results
        assert counts == {0: base.num_rows, 1: ROWS_PER_WRITE, 2: ROWS_PER_WRITE}
        assert table_version(uri) == 2
    for tag in (1, 2):  # every committed write is complete: x covers its full range once
        xs = np.sort(final.filter(pc.field("tag") == tag)["x"].to_numpy())
        assert len(xs) in (0, ROWS_PER_WRITE)
        if len(xs):
            assert np.array_equal(xs, np.arange(ROWS_PER_WRITE))


@pytest.mark.parametrize("mode", ["overwrite", "files"])
def test_two_creators_of_a_new_table_never_leave_both_writes(tmp_path, writer_script, mode):
    """No table yet: both writers see none, write their files, then race to create it.

    ``overwrite`` (write_table): deltalake used to retry the loser's commit as version 1,
    which removed nothing (it had read no files): both exited 0 and the table held both
    writes. Now exactly one creates it and the other fails with a clear error.
    ``files`` (the features job's commit): deltalake's create-or-replace either rejects the
    loser or replaces the winner's version whole; never both writes in one version."""
    uri = str(tmp_path / "t")
    sync = tmp_path / "sync"
    # Neither has committed when both are ready: both are creating the table.
    results = _race(writer_script, uri, mode, sync, when_ready=lambda: table_version(uri) is None)
    codes = sorted(code for code, _ in results)
    final = read_table(uri)
    tags = set(final["tag"].to_pylist())
    assert len(tags) == 1, f"both writes are in the table: {results}"
    assert np.array_equal(np.sort(final["x"].to_numpy()), np.arange(ROWS_PER_WRITE))
    if mode == "overwrite" or codes == [0, 3]:
        assert codes == [0, 3], results
        loser = next(err for code, err in results if code == 3)
        assert "created by a concurrent writer" in loser and uri in loser
        assert table_version(uri) == 0 and tags == {1 + [code for code, _ in results].index(0)}
    else:  # the later creator replaced the first one's version
        assert codes == [0, 0] and table_version(uri) == 1
