"""Global statistics of the features stage: the fused read rounds against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from components import groups, lake
from components.ingest_runs import new_run_id, pin_ingest, write_ingest_tables
from pipelines.config import FeaturesConfig
from pipelines.features import event_buckets
from pipelines.features_reference import reference_cutoffs
from pipelines.features_stats import global_stats, logged_time_range, scanned_time_range

T0 = 1_600_000_000
SPAN_S = 1 << 24  # > 2^20 s, so histogram bins are 2^4 s wide and hold several timestamps


def _straddling_lake(root: str) -> np.ndarray:
    """300 events packed into 40 s where the valid cut-off falls (rank 400 of 500), 200 spread
    over the span; returns the ts of every event."""
    rng = np.random.default_rng(5)
    ts = T0 + np.concatenate([rng.integers(0, SPAN_S, 200), int(0.85 * SPAN_S) + rng.integers(0, 40, 300)])
    user, item = rng.integers(1, 9, ts.size), rng.integers(5, 30, ts.size)
    tables = {
        "items": lake.items_table(np.arange(5, 30), np.zeros(25), np.zeros(25), [[]] * 25),
        "users": lake.users_table(np.arange(1, 9)),
        "events": lake.events_table(user, item, ts, np.full(ts.size, 3.0), 3),
    }
    write_ingest_tables(root, tables, new_run_id())
    return ts


@pytest.mark.parametrize("fracs", [(0.1, 0.1), (0.0, 0.0)], ids=["cutoff_inside_a_bin", "no_valid_split"])
def test_global_stats_equal_a_full_scan(ray_session, tmp_path, fracs):
    ts = _straddling_lake(str(tmp_path / "lake"))
    events = pin_ingest(str(tmp_path / "lake")).events
    cfg = FeaturesConfig(valid_frac=fracs[0], test_frac=fracs[1])
    stats = global_stats(events, event_buckets(events), cfg)

    rows = lake.read_table(events.uri)
    all_ts, all_items = rows["ts"].to_numpy(), rows["item_id"].to_numpy()
    assert stats.cutoffs == reference_cutoffs(all_ts, cfg)
    # Popularity edges from the full histogram; the buckets' interval counts summed into the
    # snapshots equal a direct count of the events before every edge (raw ids 5..29 as indices).
    shift = groups.histogram_shift(ts.min(), ts.max())
    hist = groups.ts_histogram(all_ts, ts.min(), shift)
    np.testing.assert_array_equal(
        stats.edges, groups.popularity_edges(*hist, ts.min(), shift, cfg.popularity_snapshots)
    )
    assert 1 < stats.edges.size <= cfg.popularity_snapshots
    snaps = groups.snapshot_counts(*stats.intervals, stats.edges, num_items=30)
    for k, edge in enumerate(stats.edges):
        np.testing.assert_array_equal(snaps.counts[k], np.bincount(all_items[all_ts < edge], minlength=30))
    assert (stats.num_events, stats.ts_min, stats.ts_max) == (ts.size, ts.min(), ts.max())
    if fracs == (0.1, 0.1):  # the cut-off's bin holds events on both sides of it
        bin_of = lambda t: (t - ts.min()) >> shift  # noqa: E731
        same_bin = bin_of(all_ts) == bin_of(stats.cutoffs.valid_start_ts)
        assert shift > 0 and (all_ts[same_bin] < stats.cutoffs.valid_start_ts).any()
        assert (all_ts[same_bin] >= stats.cutoffs.valid_start_ts).any()  # not train


def test_time_range_from_the_log_equals_a_scan(ray_session, tmp_path):
    ts = _straddling_lake(str(tmp_path / "lake"))
    events = pin_ingest(str(tmp_path / "lake")).events
    assert logged_time_range(events) == scanned_time_range(events, event_buckets(events)) == (500, ts.min(), ts.max())
