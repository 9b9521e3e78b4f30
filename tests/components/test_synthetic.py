"""The seeded generator: exact sizes, heavy users, sessions, learnable values, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.lake import ITEMS_SCHEMA
from components.synthetic import (
    MIN_HISTORY,
    SESSION_GAP_S,
    SyntheticConfig,
    build_world,
    generate_events,
    generate_items,
)
from models.batch import NUM_GENRES


def tiny_config(**kw) -> SyntheticConfig:
    base = dict(
        num_events=20_000, num_users=200, num_items=2_000, num_interests=8, interests_per_user=2, max_history=2_000
    )
    return SyntheticConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def default_run():
    cfg = SyntheticConfig()  # 200k events: the real defaults, still fast
    world = build_world(cfg)
    return cfg, world, generate_events(cfg, world)


def _user_index(world, user_ids: np.ndarray) -> np.ndarray:
    lookup = np.empty(world.user_ids.max() + 1, dtype=np.int64)
    lookup[world.user_ids] = np.arange(len(world.user_ids))
    return lookup[user_ids]


def test_sizes_types_and_ranges(default_run):
    cfg, world, events = default_run
    assert events.num_rows == cfg.num_events
    assert events.column_names == ["user_id", "item_id", "ts", "value"]
    assert [str(t) for t in events.schema.types] == ["int64", "int64", "int64", "float"]
    value = events["value"].to_numpy()
    assert value.min() >= 0.5 and value.max() <= 5.0
    assert np.array_equal(value * 2, np.rint(value * 2))  # half steps, like MovieLens
    assert set(np.unique(events["item_id"].to_numpy())) <= set(world.item_ids.tolist())
    assert len(np.unique(events["user_id"].to_numpy())) == cfg.num_users


def test_heavy_users_reach_ten_thousand_events(default_run):
    cfg, world, events = default_run
    per_user = np.bincount(_user_index(world, events["user_id"].to_numpy()))
    assert per_user.max() >= 10_000
    assert per_user.max() <= cfg.max_history and per_user.min() >= MIN_HISTORY
    # Power law: the median user is far lighter than the heaviest.
    assert np.median(per_user) < per_user.max() / 50


def test_sessions_and_time_order(default_run):
    _, _, events = default_run
    user, ts = events["user_id"].to_numpy(), events["ts"].to_numpy()
    same_user = user[1:] == user[:-1]
    gaps = np.diff(ts)[same_user]
    assert (gaps >= 0).all()  # each history is in time order
    between = gaps > SESSION_GAP_S
    assert 0.03 < between.mean() < 0.3  # bursts of ~mean_session_len events
    assert np.median(gaps[~between]) < 600  # in-session events minutes apart
    assert ts.min() >= 1_483_228_800 and ts.max() < 1_483_228_800 + 3 * 365 * 86_400


def test_values_follow_interest_and_items_are_zipf(default_run):
    _, world, events = default_run
    users = _user_index(world, events["user_id"].to_numpy())
    items = events["item_id"].to_numpy() - 1  # ids are 1..I
    in_interest = (world.user_interests[users] == world.item_cluster[items][:, None]).any(axis=1)
    value = events["value"].to_numpy()
    assert 0.6 < in_interest.mean() < 0.95
    assert value[in_interest].mean() > value[~in_interest].mean() + 0.8
    counts = np.sort(np.bincount(items))[::-1]
    assert counts[:20].sum() > 0.1 * len(items)  # head items dominate


def test_interests_drift_over_time(default_run):
    cfg, world, events = default_run
    users = _user_index(world, events["user_id"].to_numpy())
    heavy = np.argmax(world.history_len)
    clusters = world.item_cluster[events["item_id"].to_numpy()[users == heavy] - 1]
    first, last = np.array_split(clusters, 2)
    share_first = np.bincount(first, minlength=cfg.num_interests) / len(first)
    share_last = np.bincount(last, minlength=cfg.num_interests) / len(last)
    # Total variation between the first and second half of the heavy user's history.
    assert 0.5 * np.abs(share_first - share_last).sum() > 0.1


def test_items_table_matches_world():
    cfg = tiny_config()
    world = build_world(cfg)
    items = generate_items(cfg, world)
    assert items.schema == ITEMS_SCHEMA and items.num_rows == cfg.num_items
    assert items["item_idx"].to_pylist() == list(range(2, cfg.num_items + 2))
    tags = np.array([t[0] for t in items["tag_ids"].to_pylist()])
    assert np.array_equal(tags, world.item_cluster + 2)
    mask = items["genre_mask"].to_numpy()
    assert (mask > 0).all() and (mask < (1 << NUM_GENRES)).all()
    year = items["year"].to_numpy()
    assert year.min() >= 1920 and year.max() <= 2024


def test_seeded_and_deterministic():
    cfg = tiny_config()
    assert generate_events(cfg).equals(generate_events(cfg))
    assert generate_items(cfg).equals(generate_items(cfg))
    assert not generate_events(cfg).equals(generate_events(dataclasses.replace(cfg, seed=1)))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_events=100), "synthetic.num_events"),
        (dict(num_events=10**7), "exceeds num_users x max_history"),
        (dict(num_items=3), "synthetic.num_items"),
        (dict(interests_per_user=9), "synthetic.interests_per_user"),
    ],
)
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        build_world(tiny_config(**change))


@settings(max_examples=15, deadline=None)
@given(
    users=st.integers(1, 60),
    extra=st.integers(0, 3000),
    alpha=st.floats(0.5, 3.0),
    max_history=st.integers(5, 400),
    seed=st.integers(0, 2**31),
)
def test_history_lengths_are_exact(users, extra, alpha, max_history, seed):
    low = max_history + (users - 1) * MIN_HISTORY
    num_events = min(low + extra, users * max_history)
    cfg = tiny_config(
        num_users=users, num_events=num_events, max_history=max_history, history_alpha=alpha, seed=seed, num_items=50
    )
    world = build_world(cfg)
    lengths = world.history_len
    assert lengths.sum() == num_events
    assert lengths.max() == max_history and lengths.min() >= min(MIN_HISTORY, max_history)
    assert generate_events(cfg, world).num_rows == num_events
