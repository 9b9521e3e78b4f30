"""Ranking metrics against literal hand-made values and scikit-learn as the reference oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from components.metrics import TASKS, MetricsAccumulator, MetricsError, auc, logloss, uauc

METRIC_KEYS = {
    "engage_auc",
    "engage_uauc",
    "engage_logloss",
    "num_users_uauc_engage",
    "like_auc",
    "like_uauc",
    "like_logloss",
    "num_users_uauc_like",
    "like_auc_engaged",
    "num_candidates",
    "num_groups",
}


# ----------------------------------------------------------------------------- factories
def random_groups(seed: int, num_groups: int = 40, slots: int = 8, num_users: int = 12, is_tied: bool = False):
    """Scored groups as the evaluator sees them: (logits, labels, cand_mask, user_id).

    Padded slots hold garbage (NaN logits, label 7) that must never be read; ``is_tied`` draws
    integer logits in [-2, 2] so most scores tie; some users get one class only.
    """
    rng = np.random.default_rng(seed)
    shape = (num_groups, slots, len(TASKS))
    if is_tied:
        logits = rng.integers(-2, 3, shape).astype(np.float32)
    else:
        logits = rng.normal(0.0, 2.0, shape).astype(np.float32)
    labels = (rng.random(shape) < 0.3).astype(np.int8)
    user_id = rng.integers(1000, 1000 + num_users, num_groups).astype(np.int64)
    labels[user_id == 1000] = 0  # a user without positives
    labels[user_id == 1001] = 1  # a user without negatives
    lengths = rng.integers(0, slots + 1, num_groups)
    lengths[0] = slots  # at least one full group, so no draw is empty
    cand_mask = np.arange(slots)[None, :] < lengths[:, None]
    logits[~cand_mask] = np.nan
    labels[~cand_mask] = 7
    return logits, labels, cand_mask, user_id


def reference_metrics(logits, labels, cand_mask, user_id) -> dict[str, float]:
    """The metrics from scikit-learn, with a plain per-user loop for UAUC."""
    users = np.repeat(user_id, cand_mask.sum(axis=1))
    x, y = logits[cand_mask], labels[cand_mask]  # (M, T)
    out: dict[str, float] = {"num_candidates": len(users), "num_groups": len(user_id)}
    for t, task in enumerate(TASKS):
        out[f"{task}_auc"] = roc_auc_score(y[:, t], x[:, t]) if len(set(y[:, t])) == 2 else math.nan
        out[f"{task}_logloss"] = log_loss(y[:, t], 1.0 / (1.0 + np.exp(-x[:, t].astype(np.float64))), labels=[0, 1])
        weighted, weights = 0.0, 0
        for user in sorted(set(users.tolist())):
            mine = users == user
            if len(set(y[mine, t])) == 2:
                weighted += roc_auc_score(y[mine, t], x[mine, t]) * mine.sum()
                weights += mine.sum()
        out[f"{task}_uauc"] = weighted / weights if weights else math.nan
        out[f"num_users_uauc_{task}"] = sum(
            len(set(y[users == u, t])) == 2 for u in set(users.tolist())
        )  # users with both classes
    engaged = y[:, 0] == 1
    out["like_auc_engaged"] = roc_auc_score(y[engaged, 1], x[engaged, 1]) if len(set(y[engaged, 1])) == 2 else math.nan
    return out


def assert_metrics_equal(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == METRIC_KEYS
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12, nan_ok=True), key


def accumulate(*batches) -> MetricsAccumulator:
    acc = MetricsAccumulator()
    for batch in batches:
        acc.update(*batch)
    return acc


# ----------------------------------------------------------------------------- hand-made cases
def test_hand_made_auc_uauc_and_logloss_have_their_textbook_values():
    # Four candidates: of the 4 (positive, negative) pairs, 3 are ordered right -> AUC 0.75.
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # Ties count half: pairs (1 vs 0) = 1, (1 vs 1) = 0.5, (2 vs 0) = 1, (2 vs 1) = 1 -> 3.5 / 4.
    assert auc(np.array([0.0, 1.0, 1.0, 2.0]), np.array([0, 0, 1, 1])) == 0.875
    assert auc(np.array([3.0, 3.0, 3.0]), np.array([0, 1, 0])) == 0.5
    # User 7: the 4 candidates above (AUC 0.75); user 8: 2 candidates, positive below (AUC 0);
    # user 9: one class only, not counted. UAUC = (4 * 0.75 + 2 * 0) / 6 = 0.5; unweighted it would be 0.375.
    score = np.array([0.1, 0.4, 0.35, 0.8, 5.0, 1.0, 0.2, 0.3, 0.4])
    label = np.array([0, 0, 1, 1, 0, 1, 1, 1, 1])
    user = np.array([7, 7, 7, 7, 8, 8, 9, 9, 9])
    assert uauc(score, label, user) == (0.5, 2)
    # p = sigmoid(0) = 1/2 for a positive: log 2; p = sigmoid(ln 3) = 3/4 for a negative: log 4.
    assert logloss(np.array([0.0, math.log(3.0)]), np.array([1, 0])) == pytest.approx(1.5 * math.log(2.0))


def test_hand_made_groups_through_the_accumulator():
    # Two groups of user 7 (3 + 1 real slots; padded slots carry garbage) and one of user 8.
    logits = np.full((3, 3, 2), np.nan, np.float32)
    labels = np.full((3, 3, 2), 9, np.int8)
    logits[0, :3], labels[0, :3] = [[0.1, 0.0], [0.4, 1.0], [0.35, 2.0]], [[0, 0], [0, 1], [1, 1]]
    logits[1, :1], labels[1, :1] = [[0.8, 3.0]], [[1, 0]]
    logits[2, :2], labels[2, :2] = [[5.0, 0.0], [1.0, 0.0]], [[0, 0], [1, 1]]
    cand_mask = ~np.isnan(logits[:, :, 0])
    metrics = accumulate((logits, labels, cand_mask, np.array([7, 7, 8]))).compute()
    assert metrics["num_candidates"] == 6 and metrics["num_groups"] == 3
    # engage: user 7 has the 4 candidates of the textbook case (0.75), user 8 has AUC 0.
    assert metrics["engage_uauc"] == 0.5 and metrics["num_users_uauc_engage"] == 2
    # engage over all 6: positives 0.35, 0.8, 1.0 vs negatives 0.1, 0.4, 5.0 -> 1 + 2 + 2 of 9 pairs right.
    assert metrics["engage_auc"] == pytest.approx(5 / 9)
    # like among the 3 engaged: liked ones score 2 and 0, the disliked one 3 -> 0 of 2 pairs right;
    # over all 6, liked ones score 1, 2, 0 and disliked ones 0, 3, 0 -> 2 + 2 + (0.5 + 0.5) of 9 pairs.
    assert metrics["like_auc_engaged"] == 0.0
    assert metrics["like_auc"] == pytest.approx(5 / 9)


def test_extreme_logits_give_finite_or_exact_logloss():
    assert logloss(np.array([1000.0, -1000.0]), np.array([1, 0])) == 0.0
    assert logloss(np.array([-1000.0]), np.array([1])) == pytest.approx(1000.0)
    assert logloss(np.array([np.inf, -np.inf]), np.array([1, 0])) == 0.0
    assert logloss(np.array([-np.inf]), np.array([1])) == np.inf


# ----------------------------------------------------------------------------- scikit-learn oracle
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), is_tied=st.booleans(), num_groups=st.integers(1, 40))
def test_accumulator_equals_scikit_learn(seed, is_tied, num_groups):
    batch = random_groups(seed, num_groups=num_groups, is_tied=is_tied)
    assert_metrics_equal(accumulate(batch).compute(), reference_metrics(*batch))


@pytest.mark.parametrize("is_tied", [False, True])
def test_many_users_equal_scikit_learn(is_tied):
    batch = random_groups(seed=3, num_groups=400, slots=16, num_users=150, is_tied=is_tied)
    assert_metrics_equal(accumulate(batch).compute(), reference_metrics(*batch))


# ----------------------------------------------------------------------------- invariances
def test_batching_merging_and_states_do_not_change_the_metrics():
    logits, labels, cand_mask, user_id = random_groups(seed=5, num_groups=30, is_tied=True)
    whole = accumulate((logits, labels, cand_mask, user_id)).compute()
    parts = [(logits[s], labels[s], cand_mask[s], user_id[s]) for s in (slice(0, 7), slice(7, 8), slice(8, 30))]
    assert_metrics_equal(accumulate(*parts).compute(), whole)
    states = [accumulate(part).state() for part in parts]
    assert_metrics_equal(MetricsAccumulator.from_states(states).compute(), whole)
    merged = accumulate(parts[0]).merge(accumulate(parts[1])).merge(accumulate(parts[2]))
    assert_metrics_equal(merged.compute(), whole)
    assert merged.num_candidates == int(cand_mask.sum()) and merged.num_groups == 30


def test_permuting_candidates_and_groups_does_not_change_the_metrics():
    logits, labels, cand_mask, user_id = random_groups(seed=6, num_groups=20, is_tied=True)
    whole = accumulate((logits, labels, cand_mask, user_id)).compute()
    rng = np.random.default_rng(0)
    rows, slots = rng.permutation(20), rng.permutation(logits.shape[1])
    permuted = (logits[rows][:, slots], labels[rows][:, slots], cand_mask[rows][:, slots], user_id[rows])
    assert_metrics_equal(accumulate(permuted).compute(), whole)


def test_torch_tensors_give_the_same_metrics_as_numpy():
    logits, labels, cand_mask, user_id = random_groups(seed=7)
    tensors = (torch.from_numpy(logits), torch.from_numpy(labels).float(), torch.from_numpy(cand_mask), user_id)
    assert_metrics_equal(accumulate(tensors).compute(), accumulate((logits, labels, cand_mask, user_id)).compute())


# ----------------------------------------------------------------------------- undefined cases and errors
def test_single_class_sets_are_nan_and_count_no_user():
    logits = np.zeros((2, 2, 2), np.float32)
    labels = np.zeros((2, 2, 2), np.int8)
    labels[0, :, 1] = 1  # like: user 1 all positive, user 2 all negative
    metrics = accumulate((logits, labels, np.ones((2, 2), bool), np.array([1, 2]))).compute()
    assert math.isnan(metrics["engage_auc"]) and math.isnan(metrics["engage_uauc"])
    assert metrics["like_auc"] == 0.5 and math.isnan(metrics["like_uauc"])
    assert metrics["num_users_uauc_engage"] == metrics["num_users_uauc_like"] == 0
    assert math.isnan(metrics["like_auc_engaged"])  # no engaged candidate at all
    assert metrics["engage_logloss"] == pytest.approx(math.log(2.0))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda b: (b[0][:, :, :1], *b[1:]), r"logits must be \(B, N, 2\)"),
        (lambda b: (b[0], b[1][:, :3], *b[2:]), "labels must have the shape of logits"),
        (lambda b: (*b[:2], b[2][:, :3], b[3]), r"cand_mask must be \(B, N\)"),
        (lambda b: (*b[:3], b[3][:2]), r"user_id must be \(B,\)"),
        (lambda b: (np.where(b[2][..., None], np.nan, b[0]), *b[1:]), "NaN value"),
        (lambda b: (b[0], np.where(b[2][..., None], 2, b[1]), *b[2:]), "must be 0 or 1, found 2"),
        (lambda b: ([0.0], *b[1:]), "logits must be a torch tensor or a numpy array"),
    ],
)
def test_bad_inputs_name_what_is_wrong(change, words):
    with pytest.raises(MetricsError, match=words):
        MetricsAccumulator().update(*change(random_groups(seed=8)))


def test_compute_without_candidates_and_bad_states_fail_clearly():
    logits, labels, cand_mask, user_id = random_groups(seed=9)
    empty = accumulate((logits, labels, np.zeros_like(cand_mask), user_id))
    assert empty.num_candidates == 0
    with pytest.raises(MetricsError, match="no real candidate slot"):
        empty.compute()
    with pytest.raises(MetricsError, match="state 0 has keys"):
        MetricsAccumulator.from_states([{"logits": logits}])


def test_warm_and_cold_candidates_get_their_own_metrics_by_hand():
    # One group of user 7: warm slots 0, 1, 3 and cold slots 2, 4 (slot 5 padding).
    logits = np.zeros((1, 6, 2), np.float32)
    labels = np.zeros((1, 6, 2), np.int8)
    logits[0, :5, 1] = [0.9, 0.1, 0.8, 0.5, 0.2]
    labels[0, :5, 1] = [1, 0, 0, 1, 1]
    labels[0, :5, 0] = 1  # every real slot engaged: engage AUCs are NaN (one class)
    cand_mask = np.array([[True] * 5 + [False]])
    warm = np.array([[True, True, False, True, False, True]])
    acc = MetricsAccumulator()
    acc.update(logits, labels, cand_mask, np.array([7]), warm)
    metrics = acc.compute()
    assert metrics["num_candidates_warm"] == 3 and metrics["num_candidates_cold"] == 2
    # warm: liked 0.9, 0.5 vs disliked 0.1 -> 2 of 2 pairs; cold: liked 0.2 vs disliked 0.8 -> 0 of 1.
    assert metrics["like_auc_warm"] == 1.0 and metrics["like_auc_cold"] == 0.0
    assert metrics["like_uauc_warm"] == 1.0 and metrics["like_uauc_cold"] == 0.0
    # all five: liked 0.9, 0.5, 0.2 vs disliked 0.1, 0.8 -> (2 + 1 + 1) of 6 pairs.
    assert metrics["like_auc"] == pytest.approx(4 / 6)
    assert math.isnan(metrics["engage_auc_warm"])
    # The flags survive states; without them (any update lacking warm) no part is reported.
    again = MetricsAccumulator.from_states([acc.state()]).compute()
    assert again["like_auc_cold"] == 0.0
    acc.update(logits, labels, cand_mask, np.array([8]))
    assert "like_auc_warm" not in acc.compute()
    with pytest.raises(MetricsError, match="warm must be"):
        MetricsAccumulator().update(logits, labels, cand_mask, np.array([7]), warm[:, :3])
