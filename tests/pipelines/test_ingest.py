"""The ingest CLI end to end on real files and real Delta tables (tmp_path lakes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.ingest_runs import RUN_ID_KEY
from components.lake import (
    EVENTS_SCHEMA,
    ITEMS_SCHEMA,
    USERS_SCHEMA,
    commit_metadata,
    read_table,
    table_version,
    user_bucket,
)
from components.lake_stats import events_time_range
from pipelines.ingest import main

REPO = Path(__file__).resolve().parents[2]
SHARED_MOVIELENS = REPO.parent / "shared" / "data" / "movielens-latest-small"
TABLES = ("events", "items", "users")

RATINGS = """userId,movieId,rating,timestamp
1,1,4.0,964982703
1,2,3.5,964981247
1,99,5.0,964982224
2,1,2.0,1445714994
2,3,4.5,1445715000
2,4,1.0,1445715010
3,2,0.5,1100000000
3,4,3.0,1100000100
"""
MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Comedy
2,Heat (1995),Action|Crime|Thriller
3,Untitled,(no genres listed)
4,"American President, The (1995)",Comedy|Drama|Romance
"""
TAGS = """userId,movieId,tag,timestamp
1,1,Funny,1
2,1,funny ,2
2,2,funny,3
3,2,dark,4
"""


def tiny_movielens(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(RATINGS)
    (folder / "movies.csv").write_text(MOVIES)
    (folder / "tags.csv").write_text(TAGS)
    return folder


def ingest(lake: Path, *overrides: str) -> int:
    return main([f"--lake.root={lake}", "--lake.num_buckets=4", *overrides])


def movielens_args(folder: Path) -> list[str]:
    return ["--ingest.source=movielens", f"--ingest.movielens_dir={folder}", "--ingest.download_if_missing=false"]


SORT_KEYS = {"events": ["bucket", "user_id", "ts", "item_id"], "items": ["item_id"], "users": ["user_id"]}


def snapshot(lake: Path) -> dict[str, tuple[int | None, pa.Table | None]]:
    """Version and content (in a canonical row order: file order is not) of each table."""
    out = {}
    for name in TABLES:
        uri = str(lake / name)
        version = table_version(uri)
        content = None
        if version is not None:
            content = read_table(uri).sort_by([(k, "ascending") for k in SORT_KEYS[name]])
            content = content.combine_chunks()
        out[name] = (version, content)
    return out


@pytest.fixture
def good_lake(tmp_path) -> Path:
    """A lake holding one successful MovieLens ingest (to prove failures leave it untouched)."""
    lake = tmp_path / "lake"
    assert ingest(lake, *movielens_args(tiny_movielens(tmp_path / "ml"))) == 0
    return lake


def test_movielens_tables_follow_the_data_contract(good_lake):
    events = read_table(str(good_lake / "events"))
    items = read_table(str(good_lake / "items")).sort_by("item_id")
    users = read_table(str(good_lake / "users")).sort_by("user_id")
    assert events.num_rows == 8 and set(events.schema.names) == set(EVENTS_SCHEMA.names)
    assert events.select(EVENTS_SCHEMA.names).schema == EVENTS_SCHEMA
    assert np.array_equal(events["bucket"].to_numpy(), user_bucket(events["user_id"].to_numpy(), 4))
    assert items.schema == ITEMS_SCHEMA and users.schema == USERS_SCHEMA
    assert items["item_id"].to_pylist() == [1, 2, 3, 4, 99]  # 99 is rated but not in movies.csv
    assert items["item_idx"].to_pylist() == [2, 3, 4, 5, 6]
    assert items["year"].to_pylist() == [1995, 1995, 0, 1995, 0]
    genres = commit_metadata(str(good_lake / "items"))["genres"].split("|")
    assert genres[0] == "Comedy" and len(genres) == 7 and "(no genres listed)" not in genres
    bit = {g: 1 << i for i, g in enumerate(genres)}
    assert items["genre_mask"].to_pylist()[:3] == [
        bit["Adventure"] | bit["Comedy"],
        bit["Action"] | bit["Crime"] | bit["Thriller"],
        0,
    ]
    # Tags normalised ("Funny", "funny ") and ranked by frequency: funny=2, dark=3.
    assert items["tag_ids"].to_pylist() == [[2], [2, 3], [], [], []]
    assert users["user_idx"].to_pylist() == [2, 3, 4]
    assert events_time_range(str(good_lake / "events")) == (964981247, 1445715010)
    run_ids = {commit_metadata(str(good_lake / name)).get(RUN_ID_KEY) for name in TABLES}
    assert len(run_ids) == 1 and None not in run_ids  # one ingest run id in all three commits


def test_rerun_is_idempotent_one_new_version_each(good_lake, tmp_path, capsys):
    before = snapshot(good_lake)
    assert ingest(good_lake, *movielens_args(tmp_path / "ml")) == 0
    after = snapshot(good_lake)
    for name in TABLES:
        assert after[name][0] == before[name][0] + 1
        assert after[name][1].equals(before[name][1])  # sorted writes: identical content
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3:] == ["items          1          5", "users          1          3", "events         1          8"]


def test_events_csv_with_mapping_ms_items_and_users(tmp_path):
    events = tmp_path / "log.csv"
    events.write_text("uid,iid,when_ms,score\n7,10,1600000000500,1.5\n7,11,1600000001000,2\n8,10,1600000002000,0.0\n")
    items = tmp_path / "items.csv"
    items.write_text("id,genres,year,name\n10,Drama|Comedy,1999,Ten\n11,,,Eleven\n12,Drama,2001,\n")
    users = tmp_path / "users.csv"
    users.write_text("user\n7\n8\n9\n")
    lake = tmp_path / "lake"
    code = ingest(
        lake,
        "--ingest.source=events",
        f"--ingest.events.path={events}",
        "--ingest.events.user_col=uid",
        "--ingest.events.item_col=iid",
        "--ingest.events.ts_col=when_ms",
        "--ingest.events.ts_unit=ms",
        "--ingest.events.value_col=score",
        f"--ingest.events.items_path={items}",
        "--ingest.events.item_id_col=id",
        "--ingest.events.item_title_col=name",
        f"--ingest.events.users_path={users}",
        "--ingest.events.user_id_col=user",
    )
    assert code == 0
    ev = read_table(str(lake / "events")).sort_by([("user_id", "ascending"), ("ts", "ascending")])
    assert ev["ts"].to_pylist() == [1600000000, 1600000001, 1600000002]
    assert ev["value"].to_pylist() == [1.5, 2.0, 0.0]
    it = read_table(str(lake / "items")).sort_by("item_id")
    assert it["item_id"].to_pylist() == [10, 11, 12] and it["year"].to_pylist() == [1999, 0, 2001]
    assert it["title"].to_pylist() == ["Ten", "Eleven", None]
    assert it["genre_mask"].to_pylist() == [3, 0, 1]  # Drama (2x) = bit 0, Comedy = bit 1
    assert read_table(str(lake / "users"))["user_id"].to_pylist() == [7, 8, 9]


def test_events_parquet_with_iso_time_and_no_value(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(
        pa.table(
            {"user_id": [1, 2], "item_id": [5, 6], "timestamp": ["2020-09-13T12:26:40Z", "2020-09-13 14:26:41+02:00"]}
        ),
        path,
    )
    lake = tmp_path / "lake"
    assert (
        ingest(
            lake,
            "--ingest.source=events",
            f"--ingest.events.path={path}",
            "--ingest.events.ts_unit=iso",
            "--ingest.events.value_col=null",
        )
        == 0
    )
    ev = read_table(str(lake / "events")).sort_by("user_id")
    assert ev["ts"].to_pylist() == [1_600_000_000, 1_600_000_001]
    assert ev["value"].to_pylist() == [1.0, 1.0]


def test_synthetic_source(tmp_path):
    lake = tmp_path / "lake"
    assert (
        ingest(
            lake,
            "--ingest.source=synthetic",
            "--ingest.synthetic.num_events=3000",
            "--ingest.synthetic.num_users=50",
            "--ingest.synthetic.num_items=300",
            "--ingest.synthetic.max_history=500",
        )
        == 0
    )
    assert read_table(str(lake / "events")).num_rows == 3000
    assert read_table(str(lake / "items")).num_rows == 300
    assert read_table(str(lake / "users")).num_rows == 50


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_FILES = [
    # (file content or None for a missing file, extra overrides, words the error must contain)
    (None, [], ["nope.csv", "file not found"]),
    ("", [], ["empty"]),
    ("user_id,item_id,timestamp,value\n", [], ["no data rows"]),
    ("user_id,item_id,value\n1,2,3.0\n", [], ["column 'timestamp'", "not found", "ingest.events.ts_col"]),
    ("user_id,item_id,timestamp,value\nann,2,5,3.0\nbob,2,5,3.0\n", [], ["column 'user_id'", "integer ids"]),
    ("user_id,item_id,timestamp,value\n1,2,now,3.0\n1,3,later,1\n", [], ["column 'timestamp'", "ts_unit: iso"]),
    (
        "user_id,item_id,timestamp,value\n1,2,5,3.0\n",
        ["--ingest.events.items_path=ITEMS"],
        ["items.csv", "column 'genres'", "ingest.events.item_genres_col"],
    ),
    # A duplicated header name used to be a KeyError traceback.
    ("user_id,item_id,timestamp,value,item_id\n1,2,5,3.0,4\n", [], ["events.csv", "column 'item_id'", "2 times"]),
]


@pytest.mark.parametrize("content, extra, words", BAD_FILES)
def test_bad_input_files_fail_clearly_and_leave_tables_untouched(good_lake, tmp_path, capsys, content, extra, words):
    before = snapshot(good_lake)
    path = tmp_path / ("nope.csv" if content is None else "events.csv")
    if content is not None:
        _write(path, content)
    items = _write(tmp_path / "items.csv", "item_id,year\n2,1999\n")
    extra = [e.replace("ITEMS", str(items)) for e in extra]
    code = ingest(good_lake, "--ingest.source=events", f"--ingest.events.path={path}", *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("ingest: failed: ")
    for word in words:
        assert word in err[-1]
    after = snapshot(good_lake)
    for name in TABLES:
        assert after[name][0] == before[name][0] and after[name][1].equals(before[name][1])


def test_reject_threshold_commits_nothing_and_counts_by_reason(good_lake, tmp_path, capsys, caplog):
    rows = ["user_id,item_id,timestamp,value"] + [f"{u},{u % 5},{1_600_000_000 + u},3.5" for u in range(90)]
    rows += [
        "-1,1,1600000000,3.0",
        ",1,1600000000,3.0",
        "1,1,,3.0",
        "1,1,1600000000,NaN",
        "1,1,1600000000,7.5",
        "1,-4,1600000000,1",
        "1,1,99999999999,1",
        "x,1,1600000000,1",
        "1,1,1600000000,",
        "2,2,1600000000,-1",
    ]
    path = _write(tmp_path / "events.csv", "\n".join(rows) + "\n")
    before = snapshot(good_lake)
    assert ingest(good_lake, "--ingest.source=events", f"--ingest.events.path={path}") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "10/100 rows rejected" in err and "max_reject_frac=0.01" in err
    for reason in (
        "negative_user_id=1",
        "invalid_user_id=2",
        "invalid_ts=1",
        "invalid_value=2",
        "value_out_of_range=2",
        "negative_item_id=1",
        "ts_out_of_range=1",
    ):
        assert reason in err
    assert any("rejected row" in r.getMessage() for r in caplog.records)  # samples logged
    after = snapshot(good_lake)
    for name in TABLES:
        assert after[name][0] == before[name][0] and after[name][1].equals(before[name][1])
    # Under a looser threshold the same file ingests, keeping only the valid rows.
    assert (
        ingest(good_lake, "--ingest.source=events", f"--ingest.events.path={path}", "--ingest.max_reject_frac=0.2") == 0
    )
    assert read_table(str(good_lake / "events")).num_rows == 90


def test_config_errors_exit_2(tmp_path, capsys):
    assert ingest(tmp_path / "lake", "--ingest.sourse=events") == 2
    assert "ingest.sourse" in capsys.readouterr().err
    assert ingest(tmp_path / "lake", "--ingest.source=synthetic", "--ingest.synthetic.num_events=10") == 2
    assert "ingest.synthetic.num_events" in capsys.readouterr().err
    for override, key in [
        ("--ingest.synthetic.num_users=0", "ingest.synthetic.num_users"),
        ("--ingest.synthetic.zipf_exponent=.nan", "ingest.synthetic.zipf_exponent"),
        ("--ingest.max_tag_vocab=-1", "ingest.max_tag_vocab"),
    ]:
        assert ingest(tmp_path / "lake", "--ingest.source=synthetic", override) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("ingest: config error: ") and key in err
    assert main(["--lake.root=", "--ingest.source=synthetic"]) == 2  # used to write /items, /users, /events
    assert "lake.root is empty" in capsys.readouterr().err
    assert not (tmp_path / "lake").exists()
    assert ingest(tmp_path / "lake", *movielens_args(tmp_path / "absent")) == 1
    assert "download_if_missing" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_MOVIELENS.is_dir(), reason="shared MovieLens folder not present")
def test_real_movielens_through_the_cli_subprocess(tmp_path):
    lake = tmp_path / "lake"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.ingest",
            "--config",
            "demo",
            f"--lake.root={lake}",
            f"--ingest.movielens_dir={SHARED_MOVIELENS}",
            "--ingest.download_if_missing=false",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "table",
        "version",
        "rows",
        "items",
        "0",
        "9742",
        "users",
        "0",
        "610",
        "events",
        "0",
        "100836",
    ]
    assert events_time_range(str(lake / "events")) == (828124615, 1537799250)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.ingest",
            f"--lake.root={lake}",
            "--ingest.source=events",
            f"--ingest.events.path={tmp_path / 'missing.csv'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == f"ingest: failed: {tmp_path / 'missing.csv'}: file not found"
    assert table_version(str(lake / "events")) == 0
