"""Per-bucket build of the features stage: one bucket's events -> its ``sequences`` and ``samples`` rows.

Pure (no Ray, no storage): pipelines/features.py reads a bucket, calls :func:`build_bucket`
and writes both tables. pipelines/features_reference.py builds the same rows independently
(polars windows and joins) and is the oracle this code is checked against.

Whole-column work only: one multi-key polars sort, run arithmetic in NumPy, (groups,
candidates) matrices gathered rather than scattered, and list columns built from offsets
over those matrices without copying them. Groups come out ordered by split, so each split's
rows are one zero-copy slice for the writer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from components import groups
from components.item_features import lookup
from components.lake import SAMPLES_SCHEMA, SEQUENCES_SCHEMA
from components.transforms import OOV, action_bucket
from pipelines.config import FeaturesConfig

EVENT_COLUMNS = ["user_id", "item_id", "ts", "value"]  # read from the events table
SORT_KEY = ["user_id", "ts", "item_id", "value"]  # a user's history in time; ties by item_id, value

# Seconds a bucket task spends per phase; the driver sums them over buckets (task-seconds, so
# with tasks running side by side they add up to more than the job's wall time, buckets_s).
BUCKET_PHASES = ("read_s", "sort_s", "group_s", "negatives_s", "write_s")


@dataclass
class PhaseTimer:
    """Accumulated seconds per phase of one bucket task (``BUCKET_PHASES``).

    Phases nest: time inside an inner phase counts for the inner one only, so the phases
    never double-count and add up to the time spent inside any of them.
    """

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(BUCKET_PHASES, 0.0))
    _open: list[str] = field(default_factory=list)
    _since: float = 0.0

    def _charge(self) -> None:
        """Charge the time since the last switch to the innermost open phase."""
        now = time.perf_counter()
        if self._open:
            self.seconds[self._open[-1]] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._charge()
        self._open.append(name)
        try:
            yield
        finally:
            self._charge()
            self._open.pop()


@dataclass(frozen=True)
class BucketContext:
    """What every bucket task needs besides its own rows (shipped once through the object store).

    Sized by the item catalogue, never by the number of users: user indices are read per bucket.
    """

    features: FeaturesConfig
    item_ids: np.ndarray  # (V,) int64 raw ids, sorted
    item_idx: np.ndarray  # (V,) int32 vocabulary index of item_ids
    genre_mask: np.ndarray  # (V+2,) int32 by item_idx (0 for pad/OOV)
    year: np.ndarray  # (V+2,) int16 by item_idx
    tags: np.ndarray  # (V+2, tags_per_item) int32 by item_idx, 0-padded
    popularity: groups.PopularitySnapshots  # item counts as of each request (negatives)
    cutoffs: groups.TimeCutoffs


# ---------------------------------------------------------------------------------------------
# List columns from NumPy
# ---------------------------------------------------------------------------------------------
def _run_starts(new_run: np.ndarray) -> np.ndarray:
    """For every position, the index where its run (new_run True at run starts) began."""
    return np.maximum.accumulate(np.where(new_run, np.arange(new_run.size), 0))


def _list_column(values: np.ndarray, offsets: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def _masked_lists(dense: np.ndarray, valid: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """Rows of ``dense`` (G, W) keeping the ``valid`` slots, in order, as a list column.

    Every slot is valid unless the catalogue ran out of negatives: then the rows are the
    matrix itself (fixed-width offsets over its memory, no copy, no mask).
    """
    if valid.all():
        offsets = np.arange(dense.shape[0] + 1, dtype=np.int64) * dense.shape[1]
        return _list_column(dense.reshape(-1), offsets, value_type)
    offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))])
    return _list_column(dense[valid], offsets, value_type)


# ---------------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------------
def sort_events(events: pa.Table, ctx: BucketContext) -> dict[str, np.ndarray]:
    """The bucket's events sorted by (user_id, ts, item_id, value), with their item_idx.

    polars' multi-key sort, not ``np.lexsort`` (four stable passes): 614k events that arrive
    grouped by user (ingest's layout) sort in 7 ms against 127 ms, shuffled ones in 111 ms
    against 155 ms.
    """
    ordered = pl.from_arrow(events.select(SORT_KEY)).sort(SORT_KEY)
    user, ts, item, value = (ordered[c].to_numpy() for c in SORT_KEY)
    new_user = np.ones(user.size, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    return {
        "user": user,
        "ts": ts,
        "value": value,
        "new_user": new_user,
        "item_idx": lookup(ctx.item_ids, ctx.item_idx, item, OOV),
    }


def build_sequences(ev: dict[str, np.ndarray], bucket: int) -> pa.Table:
    """One row per user: full time-ordered history."""
    starts = np.flatnonzero(ev["new_user"])
    offsets = np.append(starts, ev["user"].size)
    return pa.table(
        [
            pa.array(ev["user"][starts], pa.int64()),
            pa.array(np.full(starts.size, bucket, np.int32)),
            _list_column(ev["item_idx"], offsets, pa.int32()),
            _list_column(action_bucket(ev["value"]), offsets, pa.int8()),
            _list_column(ev["ts"], offsets, pa.int64()),
        ],
        schema=SEQUENCES_SCHEMA,
    )


# ---------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupBounds:
    """The kept groups of a bucket, by split (train, valid, test), then user, then time: (G,) each."""

    start: np.ndarray  # int64 first (request) event of the group, into the sorted events
    num_pos: np.ndarray  # int64 positives: the group's events
    seq_end: np.ndarray  # int64 events of the user strictly before the request
    user_start: np.ndarray  # int64 first event of the group's user
    split: np.ndarray  # int8 index into groups.SPLITS of the request time


def group_bounds(ev: dict[str, np.ndarray], cfg: FeaturesConfig, cutoffs: groups.TimeCutoffs) -> GroupBounds:
    """The kept groups: session chunks with enough history, grouped by split.

    A chunk never crosses a split cut-off: otherwise a group requested before valid_start_ts
    (a train group) could carry positives from the valid period as labels.
    """
    ts, new_user = ev["ts"], ev["new_user"]
    n = ts.size
    gap = np.diff(ts, prepend=ts[:1])
    event_split = groups.split_codes(ts, cutoffs)
    new_split = np.diff(event_split, prepend=event_split[:1]) != 0
    new_run = new_user | (gap > cfg.session_gap_s) | new_split
    new_chunk = (np.arange(n) - _run_starts(new_run)) % cfg.max_positives_per_group == 0
    user_start = _run_starts(new_user)
    same_ts_start = _run_starts(new_user | (gap != 0))
    start = np.flatnonzero(new_chunk)
    end = np.append(start[1:], n) if start.size else start
    seq_end = same_ts_start[start] - user_start[start]  # events strictly before the request
    kept = np.flatnonzero(seq_end >= cfg.min_seq_len)
    # Stable: within a split, groups stay ordered by user and time.
    kept = kept[np.argsort(event_split[start[kept]], kind="stable")]
    return GroupBounds(
        start[kept], end[kept] - start[kept], seq_end[kept], user_start[start[kept]], event_split[start[kept]]
    )


def _candidates(
    ev: dict[str, np.ndarray], bounds: GroupBounds, negatives: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidates (G, C) int32, is_positive (G, C) bool, positive event (G, C) int64).

    Slot c of group g holds its c-th event while c < num_pos[g], then its negatives in
    order. Built by gathers over the whole matrix (no scatter of ragged rows).
    """
    slot = np.arange(width)  # (C,)
    is_pos = slot < bounds.num_pos[:, None]  # (G, C)
    event = np.minimum(bounds.start[:, None] + slot, ev["ts"].size - 1)  # (G, C) valid where is_pos
    if negatives.shape[1]:
        neg_slot = np.clip(slot - bounds.num_pos[:, None], 0, negatives.shape[1] - 1)  # (G, C)
        negative = np.take_along_axis(negatives, neg_slot, axis=1)
    else:  # every group is full of positives
        negative = np.zeros(is_pos.shape, np.int32)
    return np.where(is_pos, ev["item_idx"][event], negative).astype(np.int32), is_pos, event


def _group_negatives(ev: dict[str, np.ndarray], bounds: GroupBounds, gid: np.ndarray, ctx: BucketContext) -> np.ndarray:
    """Dense (G, max need) negatives of every group (components.groups.sample_negatives_asof)."""
    cfg = ctx.features
    pos_offsets = np.concatenate([[0], np.cumsum(bounds.num_pos)])
    pos_event = np.arange(pos_offsets[-1]) + np.repeat(bounds.start - pos_offsets[:-1], bounds.num_pos)
    need = cfg.candidates_per_group - bounds.num_pos
    request_ts = ev["ts"][bounds.start]
    return groups.sample_negatives_asof(
        gid, need, pos_offsets, ev["item_idx"][pos_event], request_ts, ctx.popularity, cfg.negatives_seed
    )


def build_samples(
    ev: dict[str, np.ndarray], users: pa.Table, bucket: int, ctx: BucketContext, timer: PhaseTimer | None = None
) -> pa.Table:
    """One row per kept group: candidates (positives, then negatives), labels, side features.

    Rows are ordered by split (``groups.SPLITS`` order), then user, then request time.
    """
    cfg, timer = ctx.features, timer or PhaseTimer()
    bounds = group_bounds(ev, cfg, ctx.cutoffs)
    num_groups, width = bounds.start.size, cfg.candidates_per_group
    user = ev["user"][bounds.start]
    gid = groups.group_ids(user, bounds.start - bounds.user_start)
    with timer.phase("negatives_s"):
        negatives = _group_negatives(ev, bounds, gid, ctx)
    cand, is_pos, event = _candidates(ev, bounds, negatives, width)  # (G, C) each
    like = is_pos & (ev["value"][event].astype(np.float64) >= cfg.like_threshold)
    valid = cand != 0  # 0 = catalogue ran out
    tags = ctx.tags[cand].reshape(num_groups, width * cfg.tags_per_item)  # (G, C*T)
    return pa.table(
        [
            pa.array(gid, pa.int64()),
            pa.array(user, pa.int64()),
            pa.array(lookup(users["user_id"].to_numpy(), users["user_idx"].to_numpy(), user, OOV), pa.int32()),
            pa.array(np.full(num_groups, bucket, np.int32)),
            pa.DictionaryArray.from_arrays(pa.array(bounds.split), pa.array(groups.SPLITS)).cast(pa.string()),
            pa.array(ev["ts"][bounds.start], pa.int64()),
            pa.array(bounds.seq_end, pa.int32()),
            _masked_lists(cand, valid, pa.int32()),
            _masked_lists(is_pos.view(np.int8), valid, pa.int8()),
            _masked_lists(like.view(np.int8), valid, pa.int8()),
            _masked_lists(ctx.genre_mask[cand], valid, pa.int32()),
            _masked_lists(ctx.year[cand], valid, pa.int16()),
            _masked_lists(tags, np.repeat(valid, cfg.tags_per_item, axis=1), pa.int32()),
        ],
        schema=SAMPLES_SCHEMA,
    )


def build_bucket(
    events: pa.Table, users: pa.Table, bucket: int, ctx: BucketContext, timer: PhaseTimer | None = None
) -> tuple[pa.Table, pa.Table]:
    """Events of one bucket (+ user_id -> user_idx of at least its users) -> (sequences, samples) rows.

    Samples rows are grouped by split (see :func:`build_samples`). ``timer`` collects sort_s,
    group_s (sequences and groups) and negatives_s.
    """
    timer = timer or PhaseTimer()
    with timer.phase("sort_s"):
        ev = sort_events(events, ctx)
    with timer.phase("group_s"):  # negatives_s nests inside build_samples
        return build_sequences(ev, bucket), build_samples(ev, users.sort_by("user_id"), bucket, ctx, timer)
