"""Floors: literal scores of a hand-made history, and a real lake (ingest + features) against a
plain-Python computation from the input ratings and scikit-learn."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from components import floors, lake
from components.floors import FloorError, History, SplitGroups
from components.lake import LakeConfig
from pipelines.config import FeaturesConfig, PipelineConfig
from pipelines.features import run_features
from pipelines.ingest import main as ingest_main

BASE_TS = 1_500_000_000
HOUR_S, DAY_S = 3600, 86_400
LAST_TS = BASE_TS + 100 * DAY_S  # after every random rating: the test split's last request
# Movie 1 is rated only here: three early (train-period) ratings, mean 11/3, and one by user 4
# at LAST_TS, beside movie 13 that nobody rated before (a test positive of an unseen item).
HAND_RATINGS = [  # (user, movie, rating, ts)
    (1, 1, 4.0, BASE_TS + HOUR_S),
    (2, 1, 5.0, BASE_TS + 2 * HOUR_S),
    (3, 1, 2.0, BASE_TS + 3 * HOUR_S),
    (4, 1, 4.5, LAST_TS),
    (4, 13, 3.0, LAST_TS),
]
NUM_USERS, NUM_MOVIES = 10, 13


def random_ratings(seed: int = 0) -> list[tuple[int, int, float, int]]:
    """~20 ratings per user of movies 2..12 at whole hours of 100 days (ties included)."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, NUM_USERS + 1):
        for _ in range(int(rng.integers(15, 26))):
            movie, rating = int(rng.integers(2, NUM_MOVIES)), float(rng.integers(1, 11)) / 2
            rows.append((user, movie, rating, BASE_TS + int(rng.integers(0, 100 * 24)) * HOUR_S))
    return rows


def write_movielens(folder: Path, ratings: list[tuple[int, int, float, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["userId,movieId,rating,timestamp", *(f"{u},{m},{r},{t}" for u, m, r, t in ratings)]
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    movies = [f"{m},Movie {m} (1990),Drama" for m in range(1, NUM_MOVIES + 1)]
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "\n".join(movies) + "\n")
    return folder


@pytest.fixture(scope="module")
def ratings_lake(ray_session, tmp_path_factory) -> tuple[str, list[tuple[int, int, float, int]]]:
    """A lake built by the real ingest and features stages from a small MovieLens-style folder."""
    tmp = tmp_path_factory.mktemp("floors")
    ratings = random_ratings() + HAND_RATINGS
    folder = write_movielens(tmp / "ml", ratings)
    root = str(tmp / "lake")
    source = ["--ingest.source=movielens", f"--ingest.movielens_dir={folder}", "--ingest.download_if_missing=false"]
    assert ingest_main([f"--lake.root={root}", "--lake.num_buckets=2", *source]) == 0
    features = FeaturesConfig(candidates_per_group=6, max_positives_per_group=2)
    summary = run_features(PipelineConfig(lake=LakeConfig(root=root), features=features))
    assert summary["groups_test"] > 0 and summary["groups_valid"] > 0
    return root, ratings


# ----------------------------------------------------------------------------- hand-made history
def hand_history() -> History:
    # user 10 rates item 2 with 4 and item 3 with 2; user 11 rates item 2 with 5. Global mean 11/3.
    return History(
        user_id=np.array([10, 10, 11], np.int64),
        item_idx=np.array([2, 3, 2], np.int32),
        value=np.array([4.0, 2.0, 5.0]),
    )


def hand_groups() -> SplitGroups:
    # user 10: items 2, 3, 4 (never rated) and a padded slot; user 12 (no history): items 4, 2.
    return SplitGroups(
        user_id=np.array([10, 12], np.int64),
        cand_item_idx=np.array([[2, 3, 4, 0], [4, 2, 0, 0]], np.int32),
        labels=np.array([[[1, 1], [1, 0], [0, 0], [0, 0]], [[1, 0], [1, 1], [0, 0], [0, 0]]], np.int8),
        cand_mask=np.array([[True, True, True, False], [True, True, False, False]]),
        start_ts=0,
    )


def test_scores_of_a_hand_made_history_are_the_literal_means_and_counts():
    history, groups, mask = hand_history(), hand_groups(), hand_groups().cand_mask
    assert floors.item_mean_rating(history, groups)[mask] == pytest.approx([4.5, 2.0, 11 / 3, 11 / 3, 4.5])
    assert floors.item_popularity(history, groups)[mask].tolist() == [2, 1, 0, 0, 2]
    assert floors.user_mean(history, groups)[mask] == pytest.approx([3.0, 3.0, 3.0, 11 / 3, 11 / 3])
    # Ratings read as probabilities of the max rating 5: logit(4.5 / 5) = log 9.
    by_name = {floor.name: floor for floor in floors.floor_scores(history, groups)}
    assert list(by_name) == list(floors.FLOORS)
    assert by_name["item_mean_rating"].logit[0, 0] == pytest.approx(math.log(9.0))
    metrics = floors.score_metrics(by_name["item_popularity"], groups)
    assert math.isnan(metrics["engage_logloss"]) and math.isnan(metrics["like_logloss"])
    # engage: positives count 2, 1, 0, 2 vs the negative's 0 -> 1 + 1 + 0.5 + 1 of 4 pairs;
    # like: positives 2, 2 vs negatives 1, 0, 0 -> every pair right.
    assert metrics["engage_auc"] == 0.875 and metrics["like_auc"] == 1.0


# ----------------------------------------------------------------------------- a real lake
def expected_scores(ratings, groups: SplitGroups, items: pa.Table) -> dict[str, np.ndarray]:
    """Each real candidate's floor scores from the input rows, in plain Python."""
    past = [(u, m, r) for u, m, r, t in ratings if t < groups.start_ts]
    by_movie, by_user = defaultdict(list), defaultdict(list)
    for user, movie, rating in past:
        by_movie[movie].append(rating)
        by_user[user].append(rating)
    global_mean = sum(r for _, _, r in past) / len(past)
    movie_of = dict(zip(items["item_idx"].to_pylist(), items["item_id"].to_pylist()))
    out = defaultdict(list)
    for user, cands, mask in zip(groups.user_id.tolist(), groups.cand_item_idx.tolist(), groups.cand_mask.tolist()):
        for item_idx in [c for c, is_real in zip(cands, mask) if is_real]:
            seen = by_movie.get(movie_of[item_idx], [])
            out["item_mean_rating"].append(sum(seen) / len(seen) if seen else global_mean)
            out["item_popularity"].append(len(seen))
            mine = by_user.get(user, [])
            out["user_mean"].append(sum(mine) / len(mine) if mine else global_mean)
    return {name: np.array(values) for name, values in out.items()}


def test_groups_of_the_test_split_are_the_samples_rows(ratings_lake):
    root, _ = ratings_lake
    groups = floors.read_split_groups(floors.pin_floor_inputs(root).samples, "test")
    rows = [r for r in lake.read_table(lake.table_uri(root, "samples")).to_pylist() if r["split"] == "test"]
    assert groups.start_ts == min(r["request_ts"] for r in rows)
    got = {
        (u, tuple(c[m]), tuple(map(tuple, lab[m])))
        for u, c, lab, m in zip(groups.user_id, groups.cand_item_idx, groups.labels, groups.cand_mask)
    }
    want = {(r["user_id"], tuple(r["cand_item_idx"]), tuple(zip(r["label_engage"], r["label_like"]))) for r in rows}
    assert len(groups.user_id) == len(rows) and got == want


def test_floor_scores_on_a_real_lake_equal_the_plain_python_ones(ratings_lake):
    root, ratings = ratings_lake
    inputs = floors.pin_floor_inputs(root)
    groups = floors.read_split_groups(inputs.samples, "test")
    history = floors.read_history(inputs.events, inputs.items, groups.start_ts)
    expected = expected_scores(ratings, groups, lake.read_table(lake.table_uri(root, "items")))
    for floor in floors.floor_scores(history, groups):
        assert floor.score[groups.cand_mask] == pytest.approx(expected[floor.name]), floor.name
    # The hand-made candidates of user 4's last group: movie 1 (3 early ratings) and unseen movie 13.
    idx = dict(zip(*(lake.read_table(lake.table_uri(root, "items"))[c].to_pylist() for c in ("item_id", "item_idx"))))
    last = np.flatnonzero((groups.user_id == 4) & (groups.cand_item_idx[:, 0] == idx[1]))
    assert last.size == 1 and groups.cand_item_idx[last[0], 1] == idx[13]
    assert floors.item_mean_rating(history, groups)[last[0], 0] == pytest.approx(11 / 3)
    assert floors.item_popularity(history, groups)[last[0], :2].tolist() == [3, 0]


def test_floor_metrics_on_a_real_lake_equal_scikit_learn(ratings_lake):
    root, ratings = ratings_lake
    result = floors.floor_metrics(root, "test")
    inputs = floors.pin_floor_inputs(root)
    groups = floors.read_split_groups(inputs.samples, "test")
    expected = expected_scores(ratings, groups, inputs.items.read(["item_id", "item_idx"]))
    labels = groups.labels[groups.cand_mask]  # (M, T)
    assert set(result) == set(floors.FLOORS)
    for name, scores in expected.items():
        for t, task in enumerate(("engage", "like")):
            assert result[name][f"{task}_auc"] == pytest.approx(roc_auc_score(labels[:, t], scores)), (name, task)
    p = np.clip(expected["item_mean_rating"] / 5.0, 1e-6, 1 - 1e-6)
    assert result["item_mean_rating"]["like_logloss"] == pytest.approx(log_loss(labels[:, 1], p))
    assert math.isnan(result["item_popularity"]["like_logloss"])
    # user_mean is constant within a user: every per-user AUC is 0.5.
    assert result["user_mean"]["num_users_uauc_like"] > 0 and result["user_mean"]["like_uauc"] == 0.5
    assert result["user_mean"]["num_candidates"] == int(groups.cand_mask.sum())
    assert set(floors.floor_metrics(root, "valid")) == set(floors.FLOORS)
    # Warm (rated before the run's valid cut-off) and cold candidates apart.
    cutoff = int(lake.commit_metadata(inputs.samples.uri, inputs.samples.version)["valid_start_ts"])
    items = inputs.items.read(["item_id", "item_idx"])
    rated = {item for _, item, _, ts in ratings if ts < cutoff}
    warm_idx = [i for i, raw in zip(items["item_idx"].to_pylist(), items["item_id"].to_pylist()) if raw in rated]
    warm = np.isin(groups.cand_item_idx[groups.cand_mask], warm_idx)
    assert 0 < warm.sum() < warm.size
    popularity = result["item_popularity"]
    assert popularity["num_candidates_warm"] == warm.sum() and popularity["num_candidates_cold"] == (~warm).sum()
    for part, keep in (("warm", warm), ("cold", ~warm)):
        expected_auc = roc_auc_score(labels[keep, 0], expected["item_popularity"][keep])
        assert popularity[f"engage_auc_{part}"] == pytest.approx(expected_auc, nan_ok=True), part
    assert math.isnan(popularity["like_logloss_warm"])  # a count is no probability, in any part


# ----------------------------------------------------------------------------- errors
def test_unscorable_splits_and_histories_fail_clearly(ratings_lake, tmp_path):
    root, _ = ratings_lake
    inputs = floors.pin_floor_inputs(root)
    with pytest.raises(FloorError, match="valid or test split.*'train'"):
        floors.floor_metrics(root, "train")
    with pytest.raises(FloorError, match="no event before ts 0"):
        floors.read_history(inputs.events, inputs.items, 0)
    only_train = inputs.samples.read(filters=None).filter(pc.field("split") == "train")
    uri = lake.table_uri(str(tmp_path), "samples")
    version = lake.write_table(uri, only_train, partition_by=lake.SAMPLES_PARTITION)
    with pytest.raises(FloorError, match="no rows of split 'test'"):
        floors.read_split_groups(lake.PinnedTable(uri, version), "test")
    with pytest.raises(lake.LakeError, match="no samples/sequences tables"):
        floors.floor_metrics(str(tmp_path / "nowhere"), "test")
