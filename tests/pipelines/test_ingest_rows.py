"""Ingest row checks through the CLI: exact ids, and timestamps in a unit that cannot be right."""

from __future__ import annotations

import time
from pathlib import Path

from components.lake import read_table
from tests.pipelines.test_ingest import _write, ingest


def test_ids_are_never_rounded_and_bad_ids_are_rejected_by_reason(tmp_path, capsys):
    rows = ["user_id,item_id,timestamp,value"] + [f"{u % 9},{u % 5},{1_600_000_000 + u},3.5" for u in range(190)]
    # One "1.0" cell used to make the whole column float64: ids above 2^53 were rounded, and
    # these two users (2^53 + 1, 2^53 + 3) became one. 2^63 was a traceback.
    rows += ["9007199254740993,1,1600000000,3", "9007199254740995,1,1600000001,3", "1.0,2,1600000002,3"]
    rows += ["1.5,1,1600000003,3", "9223372036854775808,1,1600000004,3"]
    path = _write(tmp_path / "events.csv", "\n".join(rows) + "\n")
    lake = tmp_path / "lake"
    assert ingest(lake, "--ingest.source=events", f"--ingest.events.path={path}") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2/195 rows rejected" in err and "non_integer_user_id=1" in err and "user_id_too_large=1" in err
    assert "Traceback" not in err and "negative_user_id" not in err
    args = ["--ingest.source=events", f"--ingest.events.path={path}", "--ingest.max_reject_frac=0.02"]
    assert ingest(lake, *args) == 0
    users = read_table(str(lake / "users"))["user_id"].to_pylist()
    assert {9007199254740993, 9007199254740995, 1} <= set(users) and len(users) == 11


def _log(path: Path, ts: list[int], extra: tuple[str, ...] = ()) -> Path:
    rows = [f"{i % 7},{i % 11},{t},3.5" for i, t in enumerate(ts)]
    return _write(path, "\n".join(["user_id,item_id,timestamp,value", *rows, *extra]) + "\n")


SECONDS = [1_600_000_000 + 60 * i for i in range(200)]


def test_milliseconds_declared_as_seconds_fail_with_the_hint(tmp_path, capsys):
    path = _log(tmp_path / "events.csv", [t * 1000 for t in SECONDS])
    assert ingest(tmp_path / "lake", "--ingest.source=events", f"--ingest.events.path={path}") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ts_out_of_range=200" in err and "looks like milliseconds: set ingest.events.ts_unit=ms" in err
    assert not (tmp_path / "lake").exists()


def test_seconds_declared_as_milliseconds_are_refused_not_put_in_1970(tmp_path, capsys):
    path = _log(tmp_path / "events.csv", SECONDS)
    args = ["--ingest.source=events", f"--ingest.events.path={path}", "--ingest.events.ts_unit=ms"]
    assert ingest(tmp_path / "lake", *args, "--ingest.min_ts_s=0") == 1  # also when 1970 is allowed
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "within 8 weeks after 1970-01-01" in err and "looks like seconds: set ingest.events.ts_unit=s" in err
    assert not (tmp_path / "lake").exists()


def test_events_before_1990_or_after_tomorrow_are_rejected_rows_by_default(tmp_path, caplog):
    path = _log(tmp_path / "events.csv", SECONDS, ("1,1,100000000,3", f"1,1,{int(time.time()) + 2 * 86_400},3"))
    lake, args = tmp_path / "lake", ["--ingest.source=events", f"--ingest.events.path={path}"]
    assert ingest(lake, *args, "--ingest.max_reject_frac=0.05") == 0
    assert read_table(str(lake / "events")).num_rows == 200  # the 1973 and the future rows are out
    assert any("ts_out_of_range=2" in r.getMessage() for r in caplog.records)
    assert ingest(lake, *args, "--ingest.min_ts_s=0", "--ingest.max_ts_ahead_s=864000") == 0  # configurable
    assert read_table(str(lake / "events")).num_rows == 202
