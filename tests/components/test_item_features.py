"""The id -> index dictionary: its hash path (many queries) equals its bisection path (few)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from components.item_features import lookup


def test_lookup_hand_case():
    keys, values = np.array([3, 8, 20], np.int64), np.array([5, 6, 7], np.int32)
    many = np.array([8, 1, 20, 3, 3, 99], np.int64)  # more queries than keys: hash path
    assert lookup(keys, values, many, default=1).tolist() == [6, 1, 7, 5, 5, 1]
    assert lookup(keys, values, many[:2], default=1).tolist() == [6, 1]  # bisection path
    assert lookup(keys[:0], values[:0], many, default=1).tolist() == [1] * 6


@settings(max_examples=30, deadline=None)
@given(
    keys=st.sets(st.integers(-(2**62), 2**62), max_size=40),
    queries=st.lists(st.integers(-(2**62), 2**62), min_size=41, max_size=120),
    seed=st.integers(0, 2**31),
)
def test_lookup_hash_path_equals_bisection(keys, queries, seed):
    sorted_keys = np.array(sorted(keys), np.int64)
    values = np.random.default_rng(seed).integers(0, 1000, sorted_keys.size).astype(np.int32)
    rng = np.random.default_rng(seed)
    query = np.array(queries, np.int64)
    if sorted_keys.size:  # half the queries hit a key
        hit = rng.random(query.size) < 0.5
        query[hit] = rng.choice(sorted_keys, hit.sum())
    hashed = lookup(sorted_keys, values, query, default=-7)  # queries > keys: hash path
    bisected = np.concatenate([lookup(sorted_keys, values, query[i : i + 1], default=-7) for i in range(query.size)])
    np.testing.assert_array_equal(hashed, bisected)
    assert hashed.dtype == values.dtype
