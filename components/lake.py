"""Delta Lake helpers shared by the pipelines: table locations and the user-bucket hash."""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, vectorised: a fixed, well-spread 64-bit hash of int64 ids."""
    with np.errstate(over="ignore"):
        z = values.astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def user_bucket(user_ids: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket of each user id (int32 in [0, num_buckets)); stable across runs and machines."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    return (mix64(np.asarray(user_ids)) % np.uint64(num_buckets)).astype(np.int32)


def table_uri(root: str, name: str) -> str:
    """Location of table ``name`` under the lake root (local folder or object-store URI)."""
    return f"{root.rstrip('/')}/{name}"
