"""Shared group-construction pieces: group ids, time cut-offs, the negative sampler."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components import groups


# ---------------------------------------------------------------------------- group ids
def test_group_ids_deterministic_non_negative_and_distinct():
    users = np.repeat(np.arange(50, dtype=np.int64), 40)
    pos = np.tile(np.arange(40, dtype=np.int64), 50)
    ids = groups.group_ids(users, pos)
    assert ids.dtype == np.int64 and (ids >= 0).all()
    assert np.unique(ids).size == ids.size
    np.testing.assert_array_equal(ids, groups.group_ids(users, pos))
    np.testing.assert_array_equal(ids[7:9], groups.group_ids(users[7:9], pos[7:9]))


# ---------------------------------------------------------------------------- cut-offs
def test_cutoff_ranks_and_errors():
    assert groups.cutoff_ranks(10, 0.1, 0.1) == (8, 9)
    assert groups.cutoff_ranks(10, 0.0, 0.0) == (10, 10)
    with pytest.raises(ValueError, match="num_events"):
        groups.cutoff_ranks(0, 0.1, 0.1)
    with pytest.raises(ValueError, match="valid_frac"):
        groups.cutoff_ranks(10, 0.6, 0.5)
    cut = groups.cutoffs_from_values(10, (10, 10), {})
    assert cut.valid_start_ts == cut.test_start_ts == groups.INT64_MAX


def _distributed_order_stats(chunks: list[np.ndarray], ranks: list[int], max_bins: int) -> dict[int, int]:
    """The three-pass protocol of pipelines/features.py, without Ray."""
    nonempty = [c for c in chunks if c.size]
    ts_min, ts_max = min(int(c.min()) for c in nonempty), max(int(c.max()) for c in nonempty)
    shift = groups.histogram_shift(ts_min, ts_max, max_bins)
    hist = groups.merge_counts([groups.ts_histogram(c, ts_min, shift) for c in chunks])
    located = groups.locate_ranks(*hist, ranks)
    bins = sorted({b for b, _ in located.values()})
    merged = groups.merge_counts([groups.values_in_bins(c, ts_min, shift, bins) for c in chunks])
    return groups.pick_ranks(located, ts_min, shift, *merged)


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.integers(0, 5000), min_size=1, max_size=300),
    cuts=st.lists(st.integers(0, 300), max_size=5),
    max_bins=st.sampled_from([2, 16, 1 << 20]),
    data=st.data(),
)
def test_distributed_order_statistics_equal_full_sort(values, cuts, max_bins, data):
    ts = np.asarray(values, dtype=np.int64) + 1_600_000_000
    cuts = sorted(set(min(c, ts.size) for c in cuts))
    chunks = np.split(ts, cuts)
    ranks = sorted(set(data.draw(st.lists(st.integers(0, ts.size - 1), min_size=1, max_size=4))))
    expected = np.sort(ts)
    assert _distributed_order_stats(chunks, ranks, max_bins) == {r: int(expected[r]) for r in ranks}


# ---------------------------------------------------------------------------- negatives
def _slow_negatives(gid, need, positives, cdf, seed, max_draws=1024):
    """Literal definition, one group at a time."""
    stream = groups.mix64(np.array([gid], np.int64) ^ groups.mix64(np.array([seed], np.int64)).view(np.int64)[0])
    j = np.arange(max_draws, dtype=np.int64)
    u = groups._uniforms(np.repeat(stream, max_draws), j)
    draws = np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1)
    chosen: list[int] = []
    for item in draws.tolist():
        if len(chosen) == need:
            break
        if item not in chosen and item not in positives:
            chosen.append(item)
    return chosen + [0] * (need - len(chosen))


def _random_groups(rng, num_groups, num_items, max_pos=6, cands=10):
    n_pos = rng.integers(1, max_pos + 1, num_groups)
    offsets = np.concatenate([[0], np.cumsum(n_pos)])
    pos_items = rng.integers(2, num_items + 2, offsets[-1])
    gids = groups.group_ids(rng.integers(0, 10**6, num_groups), rng.integers(0, 100, num_groups))
    return gids, cands - n_pos, offsets, pos_items


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), num_items=st.integers(1, 40), rounds=st.sampled_from([1, 3, 32]))
def test_sampler_matches_literal_definition(seed, num_items, rounds):
    rng = np.random.default_rng(seed)
    counts = np.concatenate([[0, 0], rng.integers(0, 50, num_items)])
    cdf = groups.negative_cdf(counts)
    gids, need, offsets, pos_items = _random_groups(rng, 12, num_items)
    out = groups.sample_negatives(gids, need, offsets, pos_items, cdf, seed=7, draws_per_round=rounds, chunk_groups=5)
    for g in range(gids.size):
        positives = set(pos_items[offsets[g] : offsets[g + 1]].tolist())
        expected = _slow_negatives(gids[g], need[g], positives, cdf, 7) if cdf[-1] > 0 else [0] * need[g]
        assert out[g, : need[g]].tolist() == expected
        assert (out[g, need[g] :] == 0).all()


def test_sampler_properties_batch_invariance_and_popularity():
    rng = np.random.default_rng(0)
    num_items = 300
    counts = np.concatenate([[0, 0], (1000 / np.arange(1, num_items + 1)).astype(np.int64)])
    counts[50] = 0  # never-seen item: never a negative
    cdf = groups.negative_cdf(counts)
    gids, need, offsets, pos_items = _random_groups(rng, 2000, num_items, max_pos=16, cands=32)
    out = groups.sample_negatives(gids, need, offsets, pos_items, cdf, seed=3)
    for g in range(0, 2000, 97):
        row = out[g, : need[g]]
        assert (row >= 2).all() and np.unique(row).size == row.size
        assert not set(row.tolist()) & set(pos_items[offsets[g] : offsets[g + 1]].tolist())
    assert not (out == 50).any()
    sub = slice(500, 700)
    part = groups.sample_negatives(
        gids[sub], need[sub], offsets[500:701] - offsets[500], pos_items[offsets[500] : offsets[700]], cdf, seed=3
    )
    np.testing.assert_array_equal(part[:, : out.shape[1]], out[sub][:, : part.shape[1]])
    assert not np.array_equal(out, groups.sample_negatives(gids, need, offsets, pos_items, cdf, seed=4))
    # Popular items are drawn more often (weights count^0.75, distinctness flattens the top).
    freq = np.bincount(out.ravel(), minlength=num_items + 2)
    assert freq[2] > freq[20] > freq[200]


def test_sampler_tiny_catalogue_pads_with_zero():
    cdf = groups.negative_cdf(np.array([0, 0, 5, 5, 5]))  # three sampleable items
    out = groups.sample_negatives(np.array([11], np.int64), np.array([5]), np.array([0, 1]), np.array([3]), cdf, seed=0)
    assert sorted(out[0, :2].tolist()) == [2, 4] and out[0, 2:].tolist() == [0, 0, 0]
    empty = groups.sample_negatives(
        np.array([11], np.int64),
        np.array([4]),
        np.array([0, 0]),
        np.array([], np.int64),
        groups.negative_cdf(np.zeros(2)),
        seed=0,
    )
    assert empty.tolist() == [[0, 0, 0, 0]]  # no catalogue item at all


def test_negative_cdf_without_train_counts_falls_back_to_uniform():
    # Only pad/OOV were counted (no train-period event hit the catalogue): every item weighs 1.
    np.testing.assert_array_equal(groups.negative_cdf(np.array([7, 3, 0, 0, 0])), [0, 0, 1, 2, 3])
    out = groups.sample_negatives(
        np.array([11], np.int64),
        np.array([3]),
        np.array([0, 1]),
        np.array([3]),
        groups.negative_cdf(np.zeros(6)),
        seed=0,
    )
    assert sorted(out[0].tolist()) == [2, 4, 5]
    # An item unseen in train keeps weight 0 as long as some item has a count.
    np.testing.assert_array_equal(groups.negative_cdf(np.array([0, 0, 0, 16])), [0, 0, 0, 8])


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=300),
    zero_run=st.integers(0, 200),
    seed=st.integers(0, 2**31),
)
def test_inverse_cdf_table_equals_bisection(counts, zero_run, seed):
    """The guide-table search is np.searchsorted(side="right") exactly: random points, every cdf
    value and its float neighbours (bin edges, ties), and long runs of weight-0 items."""
    cdf = groups.negative_cdf(np.array([0, 0, *counts[: len(counts) // 2], *[0] * zero_run, *counts], np.int64))
    x = np.random.default_rng(seed).random(2000) * cdf[-1]
    x = np.concatenate([x, cdf, np.nextafter(cdf, -np.inf), np.nextafter(cdf, np.inf), [0.0]])
    x = x[(x >= 0) & (x < cdf[-1])].reshape(-1, 1)  # any shape: (n, 1) here
    np.testing.assert_array_equal(groups.InverseCdf.build(cdf).search(x), np.searchsorted(cdf, x, side="right"))


def test_accept_draws_same_with_int32_and_int64_keys():
    rng = np.random.default_rng(0)
    blocked = np.where(rng.random((50, 6)) < 0.3, -1, rng.integers(2, 9, (50, 6)))
    draws = rng.integers(2, 9, (50, 16))
    narrow = groups._accept_draws(blocked, draws, num_items=10)  # int32 keys
    wide = groups._accept_draws(blocked, draws, num_items=2**40)  # int64 keys
    np.testing.assert_array_equal(narrow, wide)
    row = 7  # literal check of one row: first occurrences of items not blocked
    seen = set(blocked[row][blocked[row] >= 0].tolist())
    expected = []
    for item in draws[row].tolist():
        expected.append(item not in seen)
        seen.add(item)
    assert narrow[row].tolist() == expected


# ----------------------------------------------------------------------------- popularity as of the request
def test_popularity_edges_sit_at_event_quantiles_by_hand():
    ts = np.array([10, 10, 20, 30, 30, 30, 40, 90])  # 8 events
    bins, counts = groups.ts_histogram(ts, 10, 0)
    # K = 4: ranks 2, 4, 6 of the sorted times are 20, 30, 40 (one-second bins: exact quantiles).
    np.testing.assert_array_equal(groups.popularity_edges(bins, counts, 10, 0, 4), [10, 20, 30, 40])
    # K = 8: ranks 1..7 -> 10, 20, 30, 30, 30, 40, 90 (duplicates merge) after the first time 10.
    np.testing.assert_array_equal(groups.popularity_edges(bins, counts, 10, 0, 8), [10, 20, 30, 40, 90])
    # Coarse bins (shift 5: 32 s; bin 0 holds 10..41, bin 2 holds 74..105): an edge is the start
    # of the bin holding its quantile, so ranks 1..6 give 10 and rank 7 (the time 90) gives 74.
    bins, counts = groups.ts_histogram(ts, 10, 5)
    np.testing.assert_array_equal(groups.popularity_edges(bins, counts, 10, 5, 8), [10, 74])
    np.testing.assert_array_equal(groups.popularity_edges(bins, counts, 10, 5, 4), [10])


def test_snapshots_count_the_events_before_each_edge_by_hand():
    ts = np.array([10, 15, 20, 20, 35, 50])
    items = np.array([2, 3, 2, 4, 3, 2])
    edges = np.array([10, 20, 40])
    # Two buckets' triples, summed by snapshot_counts.
    parts = [groups.interval_counts(ts[:3], items[:3], edges), groups.interval_counts(ts[3:], items[3:], edges)]
    merged = [np.concatenate(c) for c in zip(*parts)]
    snaps = groups.snapshot_counts(*merged, edges, num_items=5)
    np.testing.assert_array_equal(snaps.counts[0], [0, 0, 0, 0, 0])  # nothing before 10
    np.testing.assert_array_equal(snaps.counts[1], [0, 0, 1, 1, 0])  # 10 (item 2), 15 (item 3)
    np.testing.assert_array_equal(snaps.counts[2], [0, 0, 2, 2, 1])  # + 20 (2), 20 (4), 35 (3)
    # A trailing window of one interval counts only the interval just before each edge.
    recent = groups.snapshot_counts(*merged, edges, num_items=5, window=1)
    np.testing.assert_array_equal(recent.counts[1], [0, 0, 1, 1, 0])  # 10 (2), 15 (3)
    np.testing.assert_array_equal(recent.counts[2], [0, 0, 1, 1, 1])  # 20 (2), 20 (4), 35 (3)
    # A request samples from the last edge at or before it; before the first edge, snapshot 0.
    np.testing.assert_array_equal(snaps.snapshot_of(np.array([5, 10, 19, 20, 39, 40, 99])), [0, 0, 0, 1, 1, 2, 2])


def test_asof_sampler_is_the_plain_sampler_per_snapshot_and_batch_invariant():
    rng = np.random.default_rng(5)
    num_items, num_groups = 60, 400
    counts = np.zeros((3, num_items + 2), np.int64)
    counts[1, 2:30] = rng.integers(1, 20, 28)  # snapshot 1 knows items 2..29
    counts[2] = counts[1]
    counts[2, 30:] = rng.integers(1, 20, num_items - 28)  # snapshot 2 knows every item
    snaps = groups.PopularitySnapshots(np.array([0, 100, 200]), counts)
    gids, need, offsets, pos_items = _random_groups(rng, num_groups, num_items, max_pos=6, cands=16)
    request_ts = rng.integers(0, 300, num_groups)
    out = groups.sample_negatives_asof(gids, need, offsets, pos_items, request_ts, snaps, seed=9)
    for g in range(0, num_groups, 7):
        k = int(snaps.snapshot_of(request_ts[g : g + 1])[0])
        alone = groups.sample_negatives(
            gids[g : g + 1],
            need[g : g + 1],
            offsets[g : g + 2] - offsets[g],
            pos_items[offsets[g] : offsets[g + 1]],
            snaps.cdf(k),
            seed=9,
        )
        assert out[g, : need[g]].tolist() == alone[0, : need[g]].tolist()
    # Snapshot 1's groups never draw an item that snapshot 1 has not seen.
    in_one = (request_ts >= 100) & (request_ts < 200)
    assert (out[in_one][out[in_one] > 0] < 30).all() and (out[request_ts >= 200] >= 30).any()
    half = slice(0, 200)
    part = groups.sample_negatives_asof(
        gids[half], need[half], offsets[:201], pos_items[: offsets[200]], request_ts[half], snaps, seed=9
    )
    np.testing.assert_array_equal(part, out[half][:, : part.shape[1]])
