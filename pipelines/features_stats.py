"""Global statistics of the events table for the features stage (pipelines/features.py).

Every bucket task needs a few numbers computed over ALL events: the exact time-split
cut-offs (memory bounded by the time span, see components/groups.py) and item popularity
over the train period (for negatives). Small Ray tasks read only the ``ts`` and
``item_id`` columns of one bucket each; the driver merges their answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from components import groups, lake
from pipelines.config import FeaturesConfig


def bucket_filter(bucket: int) -> pc.Expression:
    """Row filter of one bucket's partition of a bucketed table."""
    return pc.field("bucket") == pa.scalar(bucket, pa.int32())


@ray.remote(num_cpus=1)
def _pass_counts(events: lake.PinnedTable, bucket: int) -> tuple:
    ts = events.read(["ts"], bucket_filter(bucket))["ts"].to_numpy()
    return (ts.size, int(ts.min()) if ts.size else 0, int(ts.max()) if ts.size else 0)


@ray.remote(num_cpus=1)
def _pass_train_items(events: lake.PinnedTable, bucket: int, valid_start_ts: int) -> tuple:
    """(item ids, counts) of the bucket's TRAIN-period events: popularity must not see the future."""
    train = bucket_filter(bucket) & (pc.field("ts") < pa.scalar(valid_start_ts, pa.int64()))
    items = events.read(["item_id"], train)["item_id"].to_numpy()
    return np.unique(items, return_counts=True)


@ray.remote(num_cpus=1)
def _pass_histogram(events: lake.PinnedTable, bucket: int, ts_min: int, shift: int) -> tuple:
    ts = events.read(["ts"], bucket_filter(bucket))["ts"].to_numpy()
    return groups.ts_histogram(ts, ts_min, shift)


@ray.remote(num_cpus=1)
def _pass_bin_values(events: lake.PinnedTable, bucket: int, ts_min: int, shift: int, bins: list) -> tuple:
    ts = events.read(["ts"], bucket_filter(bucket))["ts"].to_numpy()
    return groups.values_in_bins(ts, ts_min, shift, bins)


@dataclass(frozen=True)
class EventStats:
    """What the global passes learn about the events table (stays on the driver)."""

    cutoffs: groups.TimeCutoffs
    item_ids: np.ndarray  # (K,) int64 raw ids of the items with TRAIN-period events
    item_counts: np.ndarray  # (K,) int64 their TRAIN-period event counts
    num_events: int
    ts_min: int  # first and last event time
    ts_max: int


def global_stats(events: lake.PinnedTable, buckets: list[int], cfg: FeaturesConfig) -> EventStats:
    """Exact time cut-offs, train-period item counts and the event count of the events table."""
    first = ray.get([_pass_counts.remote(events, b) for b in buckets])
    nonempty = [f for f in first if f[0]]
    n = sum(f[0] for f in first)
    if n == 0:
        raise lake.LakeError(
            f"events table {events.uri} (version {events.version}) has no rows "
            f"({len(buckets)} bucket partition(s)); nothing to build features from"
        )
    ranks = groups.cutoff_ranks(n, cfg.valid_frac, cfg.test_frac)
    ts_min, ts_max = min(f[1] for f in nonempty), max(f[2] for f in nonempty)
    shift = groups.histogram_shift(ts_min, ts_max)
    hist = groups.merge_counts(ray.get([_pass_histogram.remote(events, b, ts_min, shift) for b in buckets]))
    located = groups.locate_ranks(*hist, [r for r in ranks if r < n])
    values: dict[int, int] = {}
    if located:
        bins = sorted({bin_id for bin_id, _ in located.values()})
        merged = groups.merge_counts(
            ray.get([_pass_bin_values.remote(events, b, ts_min, shift, bins) for b in buckets])
        )
        values = groups.pick_ranks(located, ts_min, shift, *merged)
    cutoffs = groups.cutoffs_from_values(n, ranks, values)
    item_ids, item_counts = groups.merge_counts(
        ray.get([_pass_train_items.remote(events, b, cutoffs.valid_start_ts) for b in buckets])
    )
    return EventStats(cutoffs, item_ids, item_counts, n, ts_min, ts_max)


class FeaturesError(Exception):
    """The features run cannot build a usable output from this lake; nothing was committed."""


def check_train_period(stats: EventStats) -> None:
    """FeaturesError when no event precedes the valid split's start: the train split would be empty."""
    if stats.cutoffs.valid_start_ts <= stats.ts_min:
        one_ts = stats.ts_min == stats.ts_max
        why = "every event at one timestamp" if one_ts else "features.valid_frac + test_frac leave no earlier event"
        raise FeaturesError(
            f"no train group can be built: no event of the {stats.num_events} is before valid_start_ts="
            f"{stats.cutoffs.valid_start_ts} (the first event's time; {why}); nothing was committed"
        )
