"""A ranking request -> the model's ``GroupBatch``, exactly as training built its groups.

Raw ids go through the bundle's vocabularies (unknown ids -> the out-of-vocabulary row,
counted; known but rare ids keep their index, read the same shared row inside the model as in
evaluation, and are counted too), the user's history comes from the replica's ``SequenceStore`` (the last
``max_seq_len`` events before the request time), candidates get the item side features the
features stage gives them (components/item_features.py), and the collator that fed training
(components/collate.py) makes the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from components.bundle import ROW_COLUMN, Bundle
from components.collate import CollateConfig, collate_groups
from components.item_features import item_arrays, lookup
from components.transforms import OOV
from models.batch import GroupBatch
from serving.sequence_store import History, SequenceStore


@dataclass(frozen=True)
class Featurized:
    """One request's model input and what was unknown in it."""

    batch: GroupBatch  # one group: the user's history and the request's candidates
    history_len: int
    unknown_user: bool
    unknown_items: int
    rare_user: bool = False  # known, but reads the shared row (too few training events)
    rare_items: int = 0


class Featurizer:
    """Built once per bundle; ``featurize`` per request (pure numpy + the collator)."""

    def __init__(self, bundle: Bundle) -> None:
        self.max_seq_len = bundle.manifest.max_seq_len
        self.tags_per_item = bundle.manifest.tags_per_item
        self.items = item_arrays(bundle.items, self.tags_per_item)
        users = bundle.users.sort_by("user_id")
        self.user_ids = users["user_id"].to_numpy()
        self.user_idx = users["user_idx"].to_numpy().astype(np.int32)
        self.item_shared = _shared_rows(bundle.items, "item_idx")
        self.user_shared = _shared_rows(bundle.users, "user_idx")
        self.collate = CollateConfig(max_seq_len=self.max_seq_len, with_labels=False)

    def history(self, store: SequenceStore, user_id: int, request_ts: int) -> History:
        return store.history(user_id, request_ts, self.max_seq_len)

    def featurize(self, user_id: int, candidates: np.ndarray, request_ts: int, history: History) -> Featurized:
        """``candidates``: (N,) int64 raw item ids (unique, N >= 1)."""
        user_idx = lookup(self.user_ids, self.user_idx, np.array([user_id], np.int64), OOV)
        cand_idx = lookup(self.items["item_ids"], self.items["item_idx"], candidates, OOV)
        tags = self.items["tags"][cand_idx].reshape(-1)  # (N * tags_per_item,), OOV row is zeros
        row = {
            "user_idx": pa.array(user_idx, pa.int32()),
            "request_ts": pa.array([request_ts], pa.int64()),
            "seq_item_idx": pa.array([history.item_idx], pa.list_(pa.int32())),
            "seq_action": pa.array([history.action], pa.list_(pa.int8())),
            "seq_ts": pa.array([history.ts], pa.list_(pa.int64())),
            "cand_item_idx": pa.array([cand_idx], pa.list_(pa.int32())),
            "cand_genre_mask": pa.array([self.items["genre_mask"][cand_idx]], pa.list_(pa.int32())),
            "cand_year": pa.array([self.items["year"][cand_idx]], pa.list_(pa.int16())),
            "cand_tags": pa.array([tags], pa.list_(pa.int32())),
        }
        batch = collate_groups(pa.table(row), self.collate)
        unknown_user, unknown = bool(user_idx[0] == OOV), cand_idx == OOV
        return Featurized(
            batch,
            len(history),
            unknown_user,
            int(unknown.sum()),
            rare_user=not unknown_user and bool(self.user_shared[user_idx[0]]),
            rare_items=int((self.item_shared[cand_idx] & ~unknown).sum()),
        )


def _shared_rows(vocabulary: pa.Table, index: str) -> np.ndarray:
    """(max index + 1,) bool by vocabulary index: the id reads the shared OOV row (bundle's map)."""
    idx = vocabulary[index].to_numpy().astype(np.int64)
    shared = np.zeros(max(int(idx.max(initial=OOV)) + 1, OOV + 1), bool)
    shared[idx] = vocabulary[ROW_COLUMN].to_numpy() == OOV
    return shared
