"""Feature transforms shared by training and serving (one code path: no train/serve skew).

Every function is vectorised NumPy over whole columns and deterministic.
"""

from __future__ import annotations

import numpy as np

from models.batch import NUM_ACTIONS, NUM_GAP_BUCKETS, NUM_GENRES, NUM_YEAR_BUCKETS

PAD = 0
OOV = 1


def action_bucket(values: np.ndarray) -> np.ndarray:
    """Event value -> action id: ratings 0.5..5.0 in half steps -> 1..10; anything else clipped into 1..11."""
    v = np.asarray(values, dtype=np.float64)
    bucket = np.rint(v * 2.0)
    bucket = np.where(np.isfinite(bucket), bucket, NUM_ACTIONS - 1)
    return np.clip(bucket, 1, NUM_ACTIONS - 1).astype(np.int8)


def gap_bucket(request_ts: np.ndarray, event_ts: np.ndarray) -> np.ndarray:
    """Log2 bucket of (request - event) seconds: 1 for < 2 s ... NUM_GAP_BUCKETS-1 for the longest.

    Events are always strictly before their request, but a negative gap (clock skew in
    serving) still maps to bucket 1 rather than failing.
    """
    gap = np.maximum(np.asarray(request_ts, np.int64) - np.asarray(event_ts, np.int64), 0)
    bucket = np.floor(np.log2(gap.astype(np.float64) + 1.0)).astype(np.int64) + 1
    return np.clip(bucket, 1, NUM_GAP_BUCKETS - 1)


def year_bucket(years: np.ndarray) -> np.ndarray:
    """Release year -> 0 unknown, 1..NUM_YEAR_BUCKETS-1 five-year buckets from 1900 (clipped)."""
    y = np.asarray(years, dtype=np.int64)
    bucket = (y - 1900) // 5 + 1
    bucket = np.clip(bucket, 1, NUM_YEAR_BUCKETS - 1)
    return np.where(y > 0, bucket, 0)


def genre_multi_hot(genre_mask: np.ndarray) -> np.ndarray:
    """int32 genre bit masks (any shape) -> float32 multi-hot with a trailing NUM_GENRES axis."""
    mask = np.asarray(genre_mask, dtype=np.int64)
    bits = (mask[..., None] >> np.arange(NUM_GENRES, dtype=np.int64)) & 1
    return bits.astype(np.float32)
