"""Per-replica store of every user's behaviour sequence, loaded from the lake's ``sequences``.

The whole table at one Delta version, as flat numpy arrays sorted by user (the features stage
writes each user's full history sorted by time): a request's history is a binary search and
two slices, no I/O. A replica holds one store and swaps in a new one when ``sequences`` gets a
new version (serving/ranker.py), so the version is part of every user-side cache key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components import lake

COLUMNS = ("user_id", "item_idx", "action", "ts")


@dataclass(frozen=True)
class History:
    """One user's most recent events before the request (oldest first), each (L,)."""

    item_idx: np.ndarray  # int32
    action: np.ndarray  # int8
    ts: np.ndarray  # int64 seconds

    def __len__(self) -> int:
        return len(self.item_idx)


EMPTY = History(np.zeros(0, np.int32), np.zeros(0, np.int8), np.zeros(0, np.int64))


@dataclass(frozen=True)
class SequenceStore:
    """Users' sequences at ``version``: user ``user_ids[u]`` owns ``[offsets[u], offsets[u+1])``."""

    version: int
    user_ids: np.ndarray  # (U,) int64, sorted
    offsets: np.ndarray  # (U + 1,) int64
    item_idx: np.ndarray  # (E,) int32
    action: np.ndarray  # (E,) int8
    ts: np.ndarray  # (E,) int64

    @classmethod
    def from_table(cls, table: pa.Table, version: int) -> SequenceStore:
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise lake.LakeError(f"sequences version {version} lacks column(s) {missing}")
        table = table.select(list(COLUMNS)).sort_by("user_id")
        user_ids = table["user_id"].to_numpy()
        if user_ids.size and (np.diff(user_ids) == 0).any():
            raise lake.LakeError(f"sequences version {version} holds a user twice")
        lengths = pc.fill_null(pc.list_value_length(table["item_idx"]), 0).to_numpy().astype(np.int64)
        flat = lambda name, dtype: pc.list_flatten(table[name]).to_numpy().astype(dtype)
        return cls(
            version=version,
            user_ids=user_ids.astype(np.int64),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            item_idx=flat("item_idx", np.int32),
            action=flat("action", np.int8),
            ts=flat("ts", np.int64),
        )

    @classmethod
    def load(cls, root: str, storage_options: Mapping[str, str] | None = None, version: int | None = None):
        """The store at ``version`` (default: the latest) of the lake's ``sequences`` table."""
        table = lake.open_table(lake.table_uri(root, "sequences"), version, storage_options)
        return cls.from_table(table.to_pyarrow_table(columns=list(COLUMNS)), table.version())

    def history(self, user_id: int, before_ts: int, max_len: int) -> History:
        """The last ``max_len`` events of ``user_id`` strictly before ``before_ts`` (EMPTY if unknown)."""
        pos = int(np.searchsorted(self.user_ids, user_id))
        if pos >= self.user_ids.size or self.user_ids[pos] != user_id:
            return EMPTY
        start, end = int(self.offsets[pos]), int(self.offsets[pos + 1])
        end = start + int(np.searchsorted(self.ts[start:end], before_ts, side="left"))
        start = max(start, end - max_len)
        return History(self.item_idx[start:end], self.action[start:end], self.ts[start:end])

    def knows(self, user_id: int) -> bool:
        pos = int(np.searchsorted(self.user_ids, user_id))
        return pos < self.user_ids.size and self.user_ids[pos] == user_id

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.user_ids, self.offsets, self.item_idx, self.action, self.ts))


def latest_version(root: str, storage_options: Mapping[str, str] | None = None) -> int:
    """The newest version of the lake's ``sequences`` table (cheap: reads the Delta log only)."""
    return lake.open_table(lake.table_uri(root, "sequences"), None, storage_options).version()
