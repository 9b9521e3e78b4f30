"""Non-learned floors for the quality table: each candidate scored from past events, no training.

A model is worth its cost only above these, computed on the same split and through the same
metrics (components/metrics.py). Each floor gives one score per candidate, used for both tasks:
- ``item_mean_rating``: the candidate item's mean event ``value`` (rating); unseen items get
  the global mean;
- ``item_popularity``: the candidate item's number of events;
- ``user_mean``: the user's mean rating (unseen users: the global mean). Constant within a
  user, so its per-user AUC is 0.5 and its UAUC 0.5: it shows what UAUC removes.

"Past" is every event with ``ts`` before the evaluated split's start. The features run does not
record its time cut-offs (pipelines/features.py prints them only), so the start is the split's
first request time, ``min(request_ts)`` of its groups: that is >= the cut-off, and the events
between the two are still before every request of the split, so nothing leaks; the floors
merely see those few extra events of the split's own period.

Logloss needs a probability: the rating floors use ``score / max rating`` (clipped to
[1e-6, 1 - 1e-6]) as one, for both tasks; a count is no probability, so ``item_popularity``
reports logloss NaN (its logit is ``log1p(count)``, which only orders candidates).

Inputs are the versions one features run used: ``samples`` pinned as the loader pins it
(components/sequence_join.py) and ``events``/``items`` at the versions its commit records.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components import lake
from components.metrics import TASKS, MetricsAccumulator
from components.sequence_join import pinned_versions
from components.training_data import pin_training_data, warm_items

logger = logging.getLogger(__name__)

FLOORS = ("item_mean_rating", "item_popularity", "user_mean")
SCORED_SPLITS = ("valid", "test")  # train has no past to learn from
SAMPLE_COLUMNS = ["user_id", "request_ts", "cand_item_idx", "label_engage", "label_like"]
PROBABILITY_EPS = 1e-6


class FloorError(ValueError):
    """A floor cannot be computed; the message names the split, table or field."""


@dataclass(frozen=True)
class FloorInputs:
    """The three tables of one features run that the floors read."""

    samples: lake.PinnedTable
    events: lake.PinnedTable
    items: lake.PinnedTable


@dataclass(frozen=True)
class SplitGroups:
    """The groups of one split, padded to the widest group (padded slots: item 0, label 0)."""

    user_id: np.ndarray  # (B,) int64, raw user id (UAUC groups by it)
    cand_item_idx: np.ndarray  # (B, N) int32 item vocabulary index
    labels: np.ndarray  # (B, N, T) int8, tasks metrics.TASKS
    cand_mask: np.ndarray  # (B, N) bool, True for real candidate slots
    start_ts: int  # first request time of the split: floors learn from events strictly before it


@dataclass(frozen=True)
class History:
    """Events before a split's start: all that the floors learn from."""

    user_id: np.ndarray  # (E,) int64
    item_idx: np.ndarray  # (E,) int32, items vocabulary (lake.FIRST_INDEX.., 1 = item not in items)
    value: np.ndarray  # (E,) float64 rating

    @property
    def global_mean(self) -> float:
        return float(self.value.mean())


@dataclass(frozen=True)
class FloorScores:
    """One floor's scores of a split's candidates."""

    name: str
    score: np.ndarray  # (B, N) float64 in the floor's own unit (rating or event count)
    logit: np.ndarray  # (B, N) float64, monotone in score: what the metrics read
    is_probability: bool  # sigmoid(logit) is a meant probability, so logloss is meaningful


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def pin_floor_inputs(root: str, storage_options: Mapping[str, str] | None = None) -> FloorInputs:
    """``samples`` at the version the loader would read, ``events``/``items`` as its run read them."""
    samples_version, _, info = pinned_versions(root, storage_options)
    options = dict(storage_options or {})
    samples = lake.PinnedTable(lake.table_uri(root, "samples"), samples_version, options)
    missing = [key for key in ("events_version", "items_version") if key not in info]
    if missing:
        raise FloorError(
            f"samples table {samples.uri} version {samples_version} records no {missing} in its commit "
            "info, so the events it was built from are unknown (re-run ingest and features)"
        )
    events = lake.PinnedTable(lake.table_uri(root, "events"), int(info["events_version"]), options)
    items = lake.PinnedTable(lake.table_uri(root, "items"), int(info["items_version"]), options)
    return FloorInputs(samples, events, items)


def _padded(column: pa.ChunkedArray, name: str, lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (B, N) values, zero in padded slots, and its (B,) lengths."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy().astype(np.int64)
    own_lengths = np.diff(offsets)
    if lengths is not None and not np.array_equal(own_lengths, lengths):
        row = int(np.flatnonzero(own_lengths != lengths)[0])
        raise FloorError(
            f"samples column {name} has {own_lengths[row]} entries in row {row}, cand_item_idx has {lengths[row]}"
        )
    values = array.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    width = int(own_lengths.max()) if own_lengths.size else 0
    mask = np.arange(width)[None, :] < own_lengths[:, None]  # (B, N)
    out = np.zeros(mask.shape, values.dtype)
    out[mask] = values  # row-major boolean assignment keeps the list order
    return out, own_lengths


def read_split_groups(samples: lake.PinnedTable, split: str) -> SplitGroups:
    """The candidates and labels of every group of ``split`` (valid/test), padded to (B, N)."""
    if split not in SCORED_SPLITS:
        raise FloorError(f"floors score the valid or test split (train has no past), got {split!r}")
    rows = samples.read(SAMPLE_COLUMNS, pc.field("split") == split)
    if rows.num_rows == 0:
        raise FloorError(f"samples table {samples.uri} version {samples.version} has no rows of split {split!r}")
    cand_item_idx, lengths = _padded(rows["cand_item_idx"], "cand_item_idx")
    labels = [_padded(rows[f"label_{task}"], f"label_{task}", lengths)[0] for task in TASKS]
    return SplitGroups(
        user_id=rows["user_id"].to_numpy().astype(np.int64),
        cand_item_idx=cand_item_idx.astype(np.int32),
        labels=np.stack(labels, axis=-1).astype(np.int8),  # (B, N, T)
        cand_mask=np.arange(cand_item_idx.shape[1])[None, :] < lengths[:, None],
        start_ts=int(pc.min(rows["request_ts"]).as_py()),
    )


def read_history(events: lake.PinnedTable, items: lake.PinnedTable, before_ts: int) -> History:
    """Events with ``ts < before_ts``, their items mapped to the items vocabulary (OOV = 1)."""
    rows = events.read(["user_id", "item_id", "value"], pc.field("ts") < pa.scalar(before_ts, pa.int64()))
    if rows.num_rows == 0:
        raise FloorError(f"events table {events.uri} version {events.version} has no event before ts {before_ts}")
    vocab = items.read(["item_id", "item_idx"]).sort_by("item_id")
    vocab_ids, vocab_idx = vocab["item_id"].to_numpy(), vocab["item_idx"].to_numpy()
    item_id = rows["item_id"].to_numpy()
    pos = np.minimum(np.searchsorted(vocab_ids, item_id), max(vocab_ids.size - 1, 0))
    is_known = vocab_ids[pos] == item_id if vocab_ids.size else np.zeros(item_id.size, bool)
    return History(
        user_id=rows["user_id"].to_numpy().astype(np.int64),
        item_idx=np.where(is_known, vocab_idx[pos] if vocab_ids.size else 0, 1).astype(np.int32),
        value=rows["value"].to_numpy().astype(np.float64),
    )


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------
def _item_stats(history: History, groups: SplitGroups) -> tuple[np.ndarray, np.ndarray]:
    """(event count, value sum) per item index, long enough to index every candidate."""
    size = int(max(history.item_idx.max(), groups.cand_item_idx.max())) + 1
    counts = np.bincount(history.item_idx, minlength=size).astype(np.float64)
    sums = np.bincount(history.item_idx, weights=history.value, minlength=size)
    return counts, sums


def item_mean_rating(history: History, groups: SplitGroups) -> np.ndarray:
    """(B, N) the candidate item's mean past value; the global mean for an item without events."""
    counts, sums = _item_stats(history, groups)
    mean = np.divide(sums, counts, out=np.full(counts.shape, history.global_mean), where=counts > 0)
    return mean[groups.cand_item_idx]


def item_popularity(history: History, groups: SplitGroups) -> np.ndarray:
    """(B, N) the candidate item's number of past events."""
    counts, _ = _item_stats(history, groups)
    return counts[groups.cand_item_idx]


def user_mean(history: History, groups: SplitGroups) -> np.ndarray:
    """(B, N) the group's user's mean past value (the global mean for a user without events),
    the same for every candidate of the group."""
    users, inverse = np.unique(history.user_id, return_inverse=True)
    mean = np.bincount(inverse, weights=history.value) / np.bincount(inverse)
    pos = np.minimum(np.searchsorted(users, groups.user_id), users.size - 1)
    per_group = np.where(users[pos] == groups.user_id, mean[pos], history.global_mean)  # (B,)
    return np.broadcast_to(per_group[:, None], groups.cand_mask.shape).copy()


def rating_logit(rating: np.ndarray, max_rating: float) -> np.ndarray:
    """logit of ``rating / max_rating`` clipped into (0, 1): a rating read as a probability."""
    p = np.clip(rating / max_rating, PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
    return np.log(p) - np.log1p(-p)


def floor_scores(history: History, groups: SplitGroups) -> list[FloorScores]:
    """Every floor of ``FLOORS``, in that order."""
    max_rating = float(history.value.max())
    if max_rating <= 0.0:
        raise FloorError(f"event values must include a positive rating to scale the rating floors, max is {max_rating}")
    item_mean, popularity, by_user = (
        item_mean_rating(history, groups),
        item_popularity(history, groups),
        user_mean(history, groups),
    )
    return [
        FloorScores("item_mean_rating", item_mean, rating_logit(item_mean, max_rating), is_probability=True),
        FloorScores("item_popularity", popularity, np.log1p(popularity), is_probability=False),
        FloorScores("user_mean", by_user, rating_logit(by_user, max_rating), is_probability=True),
    ]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def score_metrics(floor: FloorScores, groups: SplitGroups, cand_warm: np.ndarray | None = None) -> dict[str, float]:
    """The metrics (components/metrics.py keys) of one floor; logloss NaN unless a probability.
    With ``cand_warm`` (B, N) bool, warm and cold candidates are also scored apart."""
    accumulator = MetricsAccumulator()
    logits = np.repeat(floor.logit[:, :, None], len(TASKS), axis=2)  # (B, N, T): one score, every task
    accumulator.update(logits, groups.labels, groups.cand_mask, groups.user_id, cand_warm)
    metrics = accumulator.compute()
    if not floor.is_probability:
        metrics.update({k: float("nan") for k in metrics if k.split("_")[1:2] == ["logloss"]})
    return metrics


def warm_candidates(root: str, inputs: FloorInputs, groups: SplitGroups) -> np.ndarray | None:
    """(B, N) bool: the candidate item is warm (components.training_data.warm_items); None when
    the features run recorded no cut-off."""
    data = pin_training_data(root, inputs.samples.storage_options, inputs.samples.version)
    warm = warm_items(data)
    return None if warm is None else warm[groups.cand_item_idx]


def floor_metrics(
    lake_root: str, split: str, storage_options: Mapping[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """Metrics of every floor (``FLOORS``) on ``split`` (valid/test) of the lake's latest features run."""
    root = lake.lake_root(lake_root)
    inputs = pin_floor_inputs(root, storage_options)
    groups = read_split_groups(inputs.samples, split)
    history = read_history(inputs.events, inputs.items, groups.start_ts)
    logger.info(
        "floors on %s: %d groups, %d past events (ts < %d)",
        split,
        groups.user_id.size,
        history.value.size,
        groups.start_ts,
    )
    warm = warm_candidates(root, inputs, groups)
    return {floor.name: score_metrics(floor, groups, warm) for floor in floor_scores(history, groups)}
