"""Features stage: hand-built groups, the Ray job against the reference, the CLI."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from components import groups, lake, lake_files
from components.config_loader import ConfigError
from components.ingest_runs import RUN_ID_KEY, new_run_id, write_ingest_tables
from components.item_features import item_arrays
from components.lake import SAMPLES_SCHEMA, SEQUENCES_SCHEMA, LakeConfig
from components.sequence_join import resolve_sequences
from components.training_data import item_train_counts, pin_training_data
from pipelines.bench_data import compare_lakes, synthetic_lake
from pipelines.config import FeaturesConfig, PipelineConfig, validate_features_config
from pipelines.features import (
    BucketContext,
    FeaturesError,
    build_bucket,
    main,
    run_features,
)
from pipelines.features_reference import reference_tables, run_reference

# ----------------------------------------------------------------------------- hand-built bucket
# user 1: two sessions (gap 4890 s > 1800 s); a ts tie at 100 (items 10 and 5) and at 5010.
HAND_EVENTS = [  # (user, ts, item, value)
    (1, 100, 10, 4.0),
    (1, 5010, 14, 3.0),
    (1, 100, 5, 2.0),
    (1, 110, 11, 5.0),
    (1, 5000, 12, 1.0),
    (1, 5010, 13, 4.5),
    (2, 300, 99, 4.0),
    (2, 4000, 20, 1.0),
]
ITEM_IDS = np.array([5, 10, 11, 12, 13, 14, *range(20, 30)], np.int64)  # item_idx 2.. in this order
HAND_CFG = FeaturesConfig(
    candidates_per_group=6,
    max_positives_per_group=2,
    session_gap_s=1800,
    tags_per_item=2,
    like_threshold=4.0,
    min_seq_len=1,
)
HAND_USERS = pa.table({"user_id": np.array([2, 1, 5], np.int64), "user_idx": np.array([8, 7, 9], np.int32)})


def _items_table() -> pa.Table:
    idx = np.arange(2, ITEM_IDS.size + 2, dtype=np.int32)
    tags = [[int(i), int(i) + 100, int(i) + 200] if i % 2 else [int(i)] for i in idx]
    return pa.table(
        {
            "item_id": ITEM_IDS,
            "item_idx": idx,
            "title": pa.nulls(idx.size, pa.string()),
            "genre_mask": idx * 3,
            "year": (1990 + idx).astype(np.int16),
            "tag_ids": pa.array(tags, pa.list_(pa.int32())),
        }
    )


def _hand_context(cutoffs: groups.TimeCutoffs) -> BucketContext:
    items = item_arrays(_items_table(), HAND_CFG.tags_per_item)
    flat = groups.PopularitySnapshots(np.array([0]), np.ones((1, ITEM_IDS.size + 2), np.int64))
    return BucketContext(features=HAND_CFG, **items, popularity=flat, cutoffs=cutoffs)


def _snapshots(edges: list[int], seen: list[list[int]]) -> groups.PopularitySnapshots:
    """Hand-built snapshots: ``seen[k]`` lists the item_idx of every event before ``edges[k]``."""
    counts = np.zeros((len(edges), ITEM_IDS.size + 2), np.int64)
    for k, items in enumerate(seen):
        np.add.at(counts[k], items, 1)
    return groups.PopularitySnapshots(np.array(edges, np.int64), counts)


def _events(rows) -> pa.Table:
    user, ts, item, value = map(np.array, zip(*rows))
    return pa.table(
        {
            "user_id": user.astype(np.int64),
            "item_id": item.astype(np.int64),
            "ts": ts.astype(np.int64),
            "value": value.astype(np.float32),
        }
    )


def test_hand_built_sequences_and_groups():
    cutoffs = groups.TimeCutoffs(valid_start_ts=5000, test_start_ts=6000)
    sequences, samples = build_bucket(_events(HAND_EVENTS), HAND_USERS, 3, _hand_context(cutoffs))
    assert sequences.schema == SEQUENCES_SCHEMA and samples.schema == SAMPLES_SCHEMA
    seq = sequences.to_pylist()
    # time order, ties by item_id (5 before 10 at ts 100); item 99 is out of vocabulary (1).
    assert seq[0]["item_idx"] == [2, 3, 4, 5, 6, 7] and seq[0]["ts"] == [100, 100, 110, 5000, 5010, 5010]
    assert seq[0]["action"] == [4, 8, 10, 2, 9, 6]  # ratings 2, 4, 5, 1, 4.5, 3 in half steps
    assert seq[1]["item_idx"] == [1, 8] and seq[0]["bucket"] == 3
    # Rows come grouped by split (the writer slices them per split), then by user and time.
    assert samples["split"].to_pylist() == ["train", "train", "valid", "valid"]
    assert samples["request_ts"].to_pylist() == [110, 4000, 5000, 5010]
    samples = samples.sort_by([("user_id", "ascending"), ("request_ts", "ascending")])
    rows = samples.to_pylist()
    first_event_pos = np.array([2, 3, 5, 1])  # the 5010 group starts at event 5 but sees only 4
    np.testing.assert_array_equal(
        samples["group_id"].to_numpy(), groups.group_ids(samples["user_id"].to_numpy(), first_event_pos)
    )
    # Groups: session chunks of <= 2 events; the first chunk of each user has no history (dropped).
    got = [(r["user_id"], r["request_ts"], r["seq_end"], r["split"]) for r in rows]
    assert got == [(1, 110, 2, "train"), (1, 5000, 3, "valid"), (1, 5010, 4, "valid"), (2, 4000, 1, "train")]
    expected_pos = [([4], [1]), ([5, 6], [0, 1]), ([7], [0]), ([8], [0])]
    for row, (pos, like) in zip(rows, expected_pos):
        cands, n = row["cand_item_idx"], len(pos)
        assert len(cands) == HAND_CFG.candidates_per_group and cands[:n] == pos
        assert row["label_engage"] == [1] * n + [0] * (len(cands) - n)
        assert row["label_like"] == like + [0] * (len(cands) - n)
        negatives = cands[n:]
        assert len(set(negatives)) == len(negatives) and not set(negatives) & set(pos)
        assert min(negatives) >= 2
        assert row["cand_genre_mask"] == [3 * c for c in cands]
        assert row["cand_year"] == [1990 + c for c in cands]
        assert row["cand_tags"] == sum(([c, c + 100] if c % 2 else [c, 0] for c in cands), [])
        assert row["user_idx"] == {1: 7, 2: 8}[row["user_id"]]
    # Every sequence event is strictly before its request, even across the ts tie at 5010.
    resolved = resolve_sequences(samples, sequences, max_seq_len=2)
    for row in resolved.to_pylist():
        assert all(t < row["request_ts"] for t in row["seq_ts"]) and len(row["seq_ts"]) == min(2, row["seq_end"])


def test_bucket_build_equals_reference_on_hand_events():
    events = _events(HAND_EVENTS)
    ref_seq, ref_samples = reference_tables(
        events.append_column("bucket", pa.array([3] * 8, pa.int32())), _items_table(), HAND_USERS, HAND_CFG
    )
    # 64 snapshots of 8 events: an edge at every distinct time (the histogram's bins are single
    # seconds here), each counting the events before it by item_idx (item 99 is OOV, idx 1).
    popularity = _snapshots(
        [100, 110, 300, 4000, 5000, 5010],
        [[], [3, 2], [3, 2, 4], [3, 2, 4, 1], [3, 2, 4, 1, 8], [3, 2, 4, 1, 8, 5]],
    )
    # Default fractions: ranks floor(8 * 0.8) = 6 and floor(8 * 0.9) = 7 of the sorted times -> 5010, 5010.
    ctx = BucketContext(**{**_hand_context(groups.TimeCutoffs(5010, 5010)).__dict__, "popularity": popularity})
    sequences, samples = build_bucket(events, HAND_USERS, 3, ctx)
    assert sequences.equals(ref_seq.sort_by("user_id"))
    assert samples.sort_by("group_id").equals(ref_samples.sort_by("group_id"))


# One user: an early event, then one session of 12 events every 10 s straddling both cut-offs.
# Fractions chosen so the reference finds valid_start = 1030 (rank 4) and test_start = 1070 (rank 8).
STRADDLE_CFG = FeaturesConfig(
    candidates_per_group=6,
    max_positives_per_group=4,
    session_gap_s=500,
    tags_per_item=2,
    min_seq_len=1,
    valid_frac=0.3,
    test_frac=0.35,
)
STRADDLE_TS = [0, *range(1000, 1120, 10)]


def test_chunks_never_cross_a_split_cutoff_and_negatives_use_popularity_as_of_the_request():
    events = _events([(7, t, int(item), 3.0) for t, item in zip(STRADDLE_TS, ITEM_IDS)])
    cutoffs = groups.TimeCutoffs(valid_start_ts=1030, test_start_ts=1070)
    # 13 events, 64 snapshots: an edge at every event, each counting the items of the 8 events
    # before it (the default trailing window; item_idx = 2 + position).
    window = STRADDLE_CFG.popularity_window
    popularity = _snapshots(STRADDLE_TS, [list(range(2 + max(0, k - window), 2 + k)) for k in range(len(STRADDLE_TS))])
    ctx = BucketContext(**{**_hand_context(cutoffs).__dict__, "features": STRADDLE_CFG, "popularity": popularity})
    _, samples = build_bucket(events, HAND_USERS, 0, ctx)
    # Without the split rule the chunks would be [1000..1030] (train, with a valid positive) and
    # [1040..1070] (valid, with a test positive).
    got = [(r["request_ts"], r["seq_end"], r["split"]) for r in samples.to_pylist()]
    assert got == [(1000, 1, "train"), (1030, 4, "valid"), (1070, 8, "test"), (1110, 12, "test")]
    ts_of_idx = dict(zip(range(2, 2 + len(STRADDLE_TS)), STRADDLE_TS))
    for row in samples.to_pylist():
        n_pos = sum(row["label_engage"])
        pos_ts = np.array([ts_of_idx[i] for i in row["cand_item_idx"][:n_pos]])
        assert pos_ts.min() == row["request_ts"]
        assert all(groups.SPLITS[int(t >= 1030) + int(t >= 1070)] == row["split"] for t in pos_ts), row
        # negatives come from popularity as of the request: only items of the 8 events before it
        seen_before = {i for i, t in ts_of_idx.items() if t < row["request_ts"]}
        seen_before = set(sorted(seen_before)[-window:])
        assert set(row["cand_item_idx"][n_pos:]) <= seen_before, row
    # ... so items first seen in the valid period are negatives of test requests (cold items are
    # negatives as their exposure says, not never).
    test_negatives = {i for r in samples.to_pylist() if r["split"] == "test" for i in r["cand_item_idx"][4:]}
    assert test_negatives & {ts_idx for ts_idx, t in ts_of_idx.items() if 1030 <= t < 1070}
    bucketed = events.append_column("bucket", pa.array([0] * len(STRADDLE_TS), pa.int32()))
    _, ref_samples = reference_tables(bucketed, _items_table(), HAND_USERS, STRADDLE_CFG)
    assert samples.sort_by("group_id").equals(ref_samples.sort_by("group_id"))


def test_validate_features_config_names_the_key():
    with pytest.raises(ConfigError, match="max_positives_per_group"):
        validate_features_config(FeaturesConfig(candidates_per_group=4, max_positives_per_group=8))
    with pytest.raises(ValueError, match="valid_frac"):
        validate_features_config(FeaturesConfig(valid_frac=0.7, test_frac=0.5))


# ----------------------------------------------------------------------------- Ray job
@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("features") / "lake")
    synthetic_lake(root, num_events=4000, num_buckets=4, seed=1, max_history=400)
    return root


def test_ray_job_equals_reference_and_has_no_leakage(ray_session, synthetic_root, tmp_path):
    config = PipelineConfig(
        lake=LakeConfig(root=synthetic_root, num_buckets=4),
        features=FeaturesConfig(max_positives_per_group=8, candidates_per_group=16),
    )
    summary = run_features(config)
    run_reference(config, str(tmp_path / "ref"))
    assert compare_lakes(synthetic_root, str(tmp_path / "ref")) == []

    events = lake.read_table(lake.table_uri(synthetic_root, "events"))
    ts = np.sort(events["ts"].to_numpy())
    assert summary["valid_start_ts"] == ts[int(ts.size * 0.8)] and summary["test_start_ts"] == ts[int(ts.size * 0.9)]
    samples = lake.read_table(lake.table_uri(synthetic_root, "samples"))
    sequences = lake.read_table(lake.table_uri(synthetic_root, "sequences"))
    assert sequences.num_rows == np.unique(events["user_id"].to_numpy()).size
    assert sum(len(x) for x in sequences["ts"].to_pylist()) == events.num_rows
    split, request = samples["split"].to_numpy(zero_copy_only=False), samples["request_ts"].to_numpy()
    assert (request[split == "train"] < summary["valid_start_ts"]).all()
    valid = request[split == "valid"]
    assert ((valid >= summary["valid_start_ts"]) & (valid < summary["test_start_ts"])).all()
    assert (request[split == "test"] >= summary["test_start_ts"]).all()
    # Both commits name the run, the events version read and the loader settings.
    for name in ("sequences", "samples"):
        info = lake.commit_metadata(lake.table_uri(synthetic_root, name))
        assert info["job_id"] == summary["job_id"] and info["max_seq_len"] == str(config.features.max_seq_len)
        assert info["events_version"] == str(summary["events_version"]) and info["candidates_per_group"] == "16"
        assert info["valid_start_ts"] == str(summary["valid_start_ts"])
        assert info["test_start_ts"] == str(summary["test_start_ts"])
    # Negatives follow popularity as of the request: every negative is an item with an event
    # before the group's request (past the first snapshot, which has no counts and is uniform).
    items = lake.read_table(lake.table_uri(synthetic_root, "items"))
    idx_of = dict(zip(items["item_id"].to_pylist(), items["item_idx"].to_pylist()))
    first_seen: dict[int, int] = {}
    for item, t in sorted(zip(events["item_id"].to_pylist(), events["ts"].to_pylist()), key=lambda p: p[1]):
        first_seen.setdefault(idx_of[item], t)
    checked = 0
    for row in samples.select(["request_ts", "cand_item_idx", "label_engage", "split"]).to_pylist():
        if row["request_ts"] <= ts[ts.size // 64]:
            continue
        negatives = row["cand_item_idx"][sum(row["label_engage"]) :]
        assert all(first_seen[i] < row["request_ts"] for i in negatives), row
        checked += 1
    assert checked > samples.num_rows // 2
    # Train-period counts per item_idx (the warm mask of evaluation), against the events.
    train_events = events.filter(pc.less(events["ts"], summary["valid_start_ts"]))["item_id"].to_pylist()
    expected = np.bincount([idx_of[i] for i in train_events], minlength=len(idx_of) + 2)
    np.testing.assert_array_equal(item_train_counts(pin_training_data(synthetic_root)), expected)
    resolved = resolve_sequences(samples, sequences, max_seq_len=10**6)
    for row in resolved.slice(0, 300).to_pylist():
        user_ts = events.filter(pc.equal(events["user_id"], row["user_id"]))["ts"].to_numpy()
        assert row["seq_end"] == (user_ts < row["request_ts"]).sum() >= 1
        assert sorted(row["seq_ts"]) == row["seq_ts"] and max(row["seq_ts"]) < row["request_ts"]
        assert len(row["cand_item_idx"]) == 16 and 1 <= sum(row["label_engage"]) <= 8
        assert row["request_ts"] in user_ts


def test_main_end_to_end_overwrites_atomically(ray_session, synthetic_root, tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(
        f"lake:\n  root: {synthetic_root}\n  num_buckets: 4\n"
        "features:\n  candidates_per_group: 8\n  max_positives_per_group: 4\n"
    )
    assert main(["--config", str(preset), "--features.max_seq_len=50"]) == 0
    samples_uri = lake.table_uri(synthetic_root, "samples")
    assert lake.commit_metadata(samples_uri)["max_seq_len"] == "50"  # the loader's default truncation
    version, rows = lake.table_version(samples_uri), lake.read_table(samples_uri).num_rows
    assert main(["--config", str(preset)]) == 0  # a re-run is one new version
    assert lake.table_version(samples_uri) == version + 1
    assert lake.read_table(samples_uri).num_rows == rows
    assert {len(c) for c in lake.read_table(samples_uri)["cand_item_idx"].to_pylist()} == {8}
    assert main(["--config", str(preset), "--features.max_positives_per_group=99"]) == 2
    assert main(["--config", str(preset), "--features.bogus=1"]) == 2
    assert lake.table_version(samples_uri) == version + 1  # failed runs commit nothing


def test_missing_events_table_is_named(ray_session, tmp_path):
    with pytest.raises(lake.LakeError, match="events"):
        run_features(PipelineConfig(lake=LakeConfig(root=str(tmp_path / "nowhere"))))


def test_events_table_without_rows_is_a_clear_error(ray_session, tmp_path):
    root = str(tmp_path / "lake")
    run = {RUN_ID_KEY: "run-1"}  # one ingest run: items and users, and events without rows
    lake.write_table(lake.table_uri(root, "items"), _items_table(), custom_metadata=run)
    lake.write_table(lake.table_uri(root, "users"), HAND_USERS, custom_metadata=run)
    uri = lake.table_uri(root, "events")  # one bucket partition holding an empty file
    part = lake_files.write_data_file(lake.EVENTS_SCHEMA.empty_table(), uri, {"bucket": "0"}, "empty")
    lake_files.commit_files_overwrite(uri, lake.EVENTS_SCHEMA, ["bucket"], [part], custom_metadata=run)
    with pytest.raises(lake.LakeError, match="events table .* has no rows"):
        run_features(PipelineConfig(lake=LakeConfig(root=root)))
    empty = lake.EVENTS_SCHEMA.empty_table()
    with pytest.raises(lake.LakeError, match="events table has no rows"):
        reference_tables(empty, _items_table(), HAND_USERS, HAND_CFG)


def test_empty_bucket_builds_empty_tables():
    sequences, samples = build_bucket(
        _events(HAND_EVENTS).slice(0, 0), HAND_USERS, 0, _hand_context(groups.TimeCutoffs(0, 0))
    )
    assert sequences.num_rows == samples.num_rows == 0 and samples.schema == SAMPLES_SCHEMA


# ----------------------------------------------------------------------------- empty output
def _ingested_lake(root: str, ts: np.ndarray) -> None:
    """One ingest run: 6 users x 10 events at the given times (cycled), items 5..29."""
    n = 60
    user, item = np.repeat(np.arange(1, 7), n // 6), 5 + np.arange(n) % 25
    tables = {
        "items": lake.items_table(np.arange(5, 30), np.zeros(25), np.zeros(25), [[]] * 25),
        "users": lake.users_table(np.arange(1, 7)),
        "events": lake.events_table(user, item, np.resize(ts, n), np.full(n, 3.0), 2),
    }
    write_ingest_tables(root, tables, new_run_id())


def test_no_train_group_because_every_event_shares_one_timestamp_exits_1(ray_session, tmp_path, capsys):
    root = str(tmp_path / "lake")
    _ingested_lake(root, np.array([1_600_000_000]))
    with pytest.raises(FeaturesError, match="no train group.*every event at one timestamp"):
        run_features(PipelineConfig(lake=LakeConfig(root=root)))
    assert main([f"--lake.root={root}"]) == 1
    assert "features: failed: no train group" in capsys.readouterr().err
    for table in ("sequences", "samples"):  # nothing committed
        assert lake.table_version(lake.table_uri(root, table)) is None


def test_no_train_group_because_min_seq_len_is_above_every_history_exits_1(ray_session, tmp_path):
    root = str(tmp_path / "lake")
    _ingested_lake(root, 1_600_000_000 + 3600 * np.arange(60))
    small = {"candidates_per_group": 4, "max_positives_per_group": 2}
    config = PipelineConfig(lake=LakeConfig(root=root), features=FeaturesConfig(**small))
    assert run_features(config)["groups_train"] > 0
    version = lake.table_version(lake.table_uri(root, "samples"))
    strict = PipelineConfig(lake=config.lake, features=FeaturesConfig(**small, min_seq_len=50))
    with pytest.raises(FeaturesError, match=r"no train group.*features\.min_seq_len=50"):
        run_features(strict)
    assert lake.table_version(lake.table_uri(root, "samples")) == version  # the previous version stays
