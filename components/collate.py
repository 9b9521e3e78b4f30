"""Resolved group rows (Arrow) -> padded ``GroupBatch`` tensors, for training and serving.

Input rows are samples whose sequence reference was resolved (components/sequence_join.py):
each row carries ``seq_item_idx``/``seq_action``/``seq_ts`` lists (oldest first) beside
the candidate lists. Everything is vectorised over Arrow list offsets; no per-row Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from components import transforms
from models.batch import GroupBatch

# Columns the collator reads; a missing one is named in the error.
REQUIRED_COLUMNS = (
    "user_idx",
    "request_ts",
    "seq_item_idx",
    "seq_action",
    "seq_ts",
    "cand_item_idx",
    "cand_genre_mask",
    "cand_year",
    "cand_tags",
)
LABEL_COLUMNS = ("label_engage", "label_like")


class CollateError(ValueError):
    """A batch does not have the columns or shapes the collator needs."""


def _list_parts(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and per-row lengths of a list column."""
    column = table.column(name).combine_chunks()
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        raise CollateError(f"column {name!r} must be a list column, got {column.type}")
    if column.null_count:
        raise CollateError(f"column {name!r} has {column.null_count} null rows")
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return values, np.diff(offsets)


def _left_pad(values: np.ndarray, lengths: np.ndarray, width: int, dtype: np.dtype) -> np.ndarray:
    """Rows of ragged ``values`` into (B, width), right-aligned (most recent at the end)."""
    out = np.zeros((len(lengths), width), dtype=dtype)
    if values.size:
        rows = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.cumsum(lengths) - lengths
        within = np.arange(values.size) - np.repeat(starts, lengths)
        out[rows, width - lengths[rows] + within] = values
    return out


def _right_pad(values: np.ndarray, lengths: np.ndarray, width: int, dtype: np.dtype) -> np.ndarray:
    """Rows of ragged ``values`` into (B, width), left-aligned (candidate slots)."""
    out = np.zeros((len(lengths), width), dtype=dtype)
    if values.size:
        rows = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.cumsum(lengths) - lengths
        out[rows, np.arange(values.size) - np.repeat(starts, lengths)] = values
    return out


# Centres and scales of the user dense features. Each feature lands at roughly unit spread around
# 0 (MovieLens train requests: std 0.85, 0.89, 0.91), the scale of the N(0, 1) embedding entries it
# is concatenated with. Divided by 10 or 32 instead (std ~0.09), the user's mean rating, which
# alone ranks like-among-engaged at AUC 0.84, was all but invisible to the ranker's tokenizer:
# `full` like AUC 0.731 -> 0.760, like-among-engaged 0.65 -> 0.74 (reference loop, seed 0;
# docs/MODELS.md "Dense scale").
# Fixed numbers, not statistics of a lake, so that training and serving cannot disagree.
LOG_HISTORY_CENTRE = 5.0  # log1p(history size): e^5 ~ 150 events
ACTION_CENTRE = 7.0  # mean action bucket (1..10 = ratings 0.5..5, 11 = other): rating 3.5
GAP_CENTRE, GAP_SCALE = 16.0, 8.0  # log2 gap bucket of the latest event (1..31): ~9 hours


def user_dense_features(seq_len: np.ndarray, action_sum: np.ndarray, last_gap_bucket: np.ndarray) -> np.ndarray:
    """Request-time user features (B, 3): history size, mean action, recency. Shared with serving.

    ``[log1p(n) - 5, mean action - 7 (0 with no history), (gap bucket of the latest event - 16) / 8]``
    """
    n = np.maximum(seq_len, 1).astype(np.float32)
    return np.stack(
        [
            np.log1p(seq_len.astype(np.float32)) - LOG_HISTORY_CENTRE,
            np.where(seq_len > 0, action_sum / n - ACTION_CENTRE, 0.0).astype(np.float32),
            (last_gap_bucket.astype(np.float32) - GAP_CENTRE) / GAP_SCALE,
        ],
        axis=1,
    ).astype(np.float32)


@dataclass(frozen=True)
class CollateConfig:
    """``max_seq_len`` truncates (keeps the most recent); ``pad_seq_to`` fixes L (else the batch max)."""

    max_seq_len: int = 2000
    pad_seq_to: int | None = None
    with_labels: bool = True


def collate_groups(table: pa.Table, config: CollateConfig = CollateConfig()) -> GroupBatch:
    """Resolved group rows -> ``GroupBatch`` (see models/batch.py for the conventions)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if config.with_labels:
        missing += [c for c in LABEL_COLUMNS if c not in table.column_names]
    if missing:
        raise CollateError(f"batch is missing column(s) {missing}; has {table.column_names}")
    user = _user_side(table, config)
    cand = _candidate_side(table, config.with_labels)
    labels = cand.pop("labels", None)
    return GroupBatch(
        user_id=torch.from_numpy(table.column("user_idx").to_numpy().astype(np.int64)),
        **{k: torch.from_numpy(v) for k, v in {**user, **cand}.items()},
        labels=None if labels is None else torch.from_numpy(labels),
    )


def _user_side(table: pa.Table, config: CollateConfig) -> dict[str, np.ndarray]:
    """Left-padded, truncated sequence arrays and the request-time user features."""
    batch_size = table.num_rows
    request_ts = table.column("request_ts").to_numpy().astype(np.int64)
    seq = {name: _list_parts(table, name) for name in ("seq_item_idx", "seq_action", "seq_ts")}
    lengths = seq["seq_item_idx"][1]
    for name, (_, other) in seq.items():
        if not np.array_equal(other, lengths):
            raise CollateError(f"column {name!r} lengths differ from seq_item_idx")
    seq = {name: _keep_recent(values, lengths, config.max_seq_len) for name, (values, _) in seq.items()}
    kept = np.minimum(lengths, config.max_seq_len)
    width = config.pad_seq_to or max(int(kept.max(initial=0)), 1)
    if kept.max(initial=0) > width:
        raise CollateError(f"sequence of length {kept.max()} does not fit pad_seq_to={width}")
    actions = seq["seq_action"].astype(np.int64)
    seq_gap = _left_pad(transforms.gap_bucket(np.repeat(request_ts, kept), seq["seq_ts"]), kept, width, np.int64)
    action_sum = np.bincount(np.repeat(np.arange(batch_size), kept), weights=actions, minlength=batch_size)
    return {
        "user_dense": user_dense_features(kept, action_sum, seq_gap[:, -1]),
        "seq_item": _left_pad(seq["seq_item_idx"], kept, width, np.int64),
        "seq_action": _left_pad(actions, kept, width, np.int64),
        "seq_gap": seq_gap,
        "seq_len": kept.astype(np.int64),
    }


def _candidate_side(table: pa.Table, with_labels: bool) -> dict[str, np.ndarray]:
    """Right-padded candidate arrays (+ labels), with the mask of real slots."""
    cand_item, cand_len = _list_parts(table, "cand_item_idx")
    num_cand = max(int(cand_len.max(initial=0)), 1)
    tags, tag_len = _list_parts(table, "cand_tags")
    first = int(np.argmax(cand_len > 0))  # a row with candidates fixes the tags per candidate
    n_tags = int(tag_len[first] // cand_len[first]) if cand_len.any() else 0
    if not np.array_equal(tag_len, cand_len * n_tags):
        raise CollateError("cand_tags must hold the same number of tags for every candidate")
    pad = lambda name, dtype: _right_pad(_list_parts(table, name)[0], cand_len, num_cand, dtype)
    out = {
        "cand_item": _right_pad(cand_item, cand_len, num_cand, np.int64),
        "cand_genres": transforms.genre_multi_hot(pad("cand_genre_mask", np.int64)),
        "cand_year": transforms.year_bucket(pad("cand_year", np.int64)),
        "cand_tags": _right_pad(tags, tag_len, num_cand * n_tags, np.int64).reshape(table.num_rows, num_cand, n_tags),
        "cand_mask": _right_pad(np.ones(cand_item.size, bool), cand_len, num_cand, bool),
    }
    if with_labels:
        out["labels"] = np.stack([pad(c, np.float32) for c in LABEL_COLUMNS], axis=-1)
    return out


def _keep_recent(values: np.ndarray, lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Drop all but the last ``max_len`` values of each ragged row."""
    if lengths.size == 0 or lengths.max(initial=0) <= max_len:
        return values
    starts = np.cumsum(lengths) - lengths
    within = np.arange(values.size) - np.repeat(starts, lengths)
    keep = within >= np.repeat(lengths - max_len, lengths)
    return values[keep]


class GroupCollateFn(ArrowBatchCollateFn):
    """``iter_torch_batches(collate_fn=GroupCollateFn(...))`` -> ``GroupBatch`` (STACK.md: subclass, not a function)."""

    def __init__(self, config: CollateConfig = CollateConfig()) -> None:
        super().__init__()
        self.config = config

    def __call__(self, batch: pa.Table) -> GroupBatch:
        return collate_groups(batch, self.config)
