"""What a training or evaluation run reads, pinned once: table versions, split sizes, vocabularies.

Training pins the ``samples`` version (and through it the ``sequences`` version of the same
features run and the ``items``/``users`` versions of the ingest run it read) before anything
starts; checkpoints record the pins, and a resumed run re-pins the same versions. So a
features or ingest run that rewrites the lake mid-training changes nothing for the run.
Vocabulary sizes (embedding table rows) come from the pinned ``items``/``users`` tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components import lake
from components.sequence_join import pinned_versions

if TYPE_CHECKING:
    from models.variants import ModelConfig

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Vocabulary:
    """Embedding table rows, padding (0) and out-of-vocabulary (1) included."""

    item_vocab: int
    user_vocab: int
    tag_vocab: int


@dataclass(frozen=True)
class TrainingData:
    """The pinned inputs of one run (see module docstring)."""

    lake_root: str
    samples_version: int
    sequences_version: int
    max_seq_len: int  # the features run's (full histories are stored; the loader truncates)
    split_rows: dict[str, int]  # groups per split
    vocabulary: Vocabulary
    storage_options: dict[str, str] = field(default_factory=dict)
    # The features run's valid cut-off (None: a lake written before runs recorded it); an item
    # with an event before it is warm (docs/DATA.md "Warm and cold items").
    valid_start_ts: int | None = None
    users_version: int | None = None  # the pinned ``users`` (user_id -> user_idx) of the features run

    def load_groups(self, split: str, max_seq_len: int):
        """Ray Dataset of resolved groups of ``split`` at the pinned versions."""
        from components.sequence_join import load_groups

        return load_groups(
            self.lake_root,
            split,
            max_seq_len,
            storage_options=self.storage_options,
            samples_version=self.samples_version,
        )


def split_rows(samples: lake.PinnedTable) -> dict[str, int]:
    """Rows per split of a pinned samples table, from the Delta log's per-file counts."""
    actions = pa.table(lake.open_table(samples.uri, samples.version, samples.storage_options).get_add_actions(True))
    out = dict.fromkeys(SPLITS, 0)
    if actions.num_rows == 0:
        return out
    if "num_records" not in actions.column_names or actions["num_records"].null_count:
        table = samples.read(["split"])
        counts = pc.value_counts(table["split"]).to_pylist()
        return out | {c["values"]: int(c["counts"]) for c in counts}
    grouped = actions.group_by("partition.split").aggregate([("num_records", "sum")]).to_pylist()
    return out | {g["partition.split"]: int(g["num_records_sum"]) for g in grouped}


def vocabulary(items: lake.PinnedTable, users: lake.PinnedTable) -> Vocabulary:
    """Table sizes from the pinned items/users: the largest index + 1 (indices start at 2)."""
    item_table = items.read(["item_idx", "tag_ids"])
    if item_table.num_rows == 0:
        raise lake.LakeError(f"items table {items.uri} version {items.version} is empty")
    max_item = pc.max(item_table["item_idx"]).as_py()
    max_tag = pc.max(pc.list_flatten(item_table["tag_ids"])).as_py()
    max_user = pc.max(users.read(["user_idx"])["user_idx"]).as_py()
    if max_user is None:
        raise lake.LakeError(f"users table {users.uri} version {users.version} is empty")
    # Two rows at least (padding, OOV) even when no item has a tag.
    return Vocabulary(item_vocab=max_item + 1, user_vocab=max_user + 1, tag_vocab=max(max_tag or 1, 1) + 1)


def pin_training_data(
    root: str, storage_options: Mapping[str, str] | None = None, samples_version: int | None = None
) -> TrainingData:
    """Pin the latest features run (or ``samples_version``'s) and everything it was built from."""
    root = lake.lake_root(root)
    options = dict(storage_options or {})
    samples_v, sequences_v, info = pinned_versions(root, options, samples_version)
    samples = lake.PinnedTable(lake.table_uri(root, "samples"), samples_v, options)
    missing = [k for k in ("items_version", "users_version", "max_seq_len") if k not in info]
    if missing:
        raise lake.LakeError(
            f"samples table {samples.uri} version {samples_v} records no {missing} in its commit info "
            "(written by an older features stage; re-run features)"
        )
    items = lake.PinnedTable(lake.table_uri(root, "items"), int(info["items_version"]), options)
    users = lake.PinnedTable(lake.table_uri(root, "users"), int(info["users_version"]), options)
    return TrainingData(
        lake_root=root,
        samples_version=samples_v,
        sequences_version=sequences_v,
        max_seq_len=int(info["max_seq_len"]),
        split_rows=split_rows(samples),
        vocabulary=vocabulary(items, users),
        storage_options=options,
        valid_start_ts=int(info["valid_start_ts"]) if "valid_start_ts" in info else None,
        users_version=users.version,
    )


def train_counts(data: TrainingData, kinds: tuple[str, ...] = ("item", "user")) -> dict[str, np.ndarray] | None:
    """Events before the valid period per vocabulary index, ``{"item": (item_vocab,), "user":
    (user_vocab,)}`` int64, from the pinned ``sequences`` (every event is in exactly one user's
    sequence); None when the lake records no cut-off. Item counts ``> 0`` are the warm mask of
    evaluation (components/metrics.py); both decide which ids share a row (models/id_rows.py)."""
    if data.valid_start_ts is None:
        return None
    sequences = lake.PinnedTable(
        lake.table_uri(data.lake_root, "sequences"), data.sequences_version, data.storage_options
    )
    table = sequences.read(["user_id", "item_idx", "ts"] if "user" in kinds else ["item_idx", "ts"])
    before = pc.list_flatten(table["ts"]).to_numpy() < data.valid_start_ts
    out = {}
    if "item" in kinds:
        items = pc.list_flatten(table["item_idx"]).to_numpy()
        out["item"] = np.bincount(items[before], minlength=data.vocabulary.item_vocab).astype(np.int64)
    if "user" in kinds:
        out["user"] = _user_counts(data, table, before)
    return out


def _user_counts(data: TrainingData, sequences: pa.Table, before: np.ndarray) -> np.ndarray:
    """(user_vocab,) int64 events before the cut-off per user_idx (users absent from the pinned
    ``users`` table would read the OOV row anyway and are left out)."""
    from components.item_features import lookup
    from components.transforms import OOV

    if data.users_version is None:
        raise lake.LakeError("user counts need the pinned users version (pin the data with pin_training_data)")
    per_row = np.bincount(
        pc.list_parent_indices(sequences["ts"]).to_numpy()[before], minlength=sequences.num_rows
    ).astype(np.int64)
    users = lake.PinnedTable(lake.table_uri(data.lake_root, "users"), data.users_version, data.storage_options)
    vocab = users.read(["user_id", "user_idx"]).sort_by("user_id")
    idx = lookup(vocab["user_id"].to_numpy(), vocab["user_idx"].to_numpy(), sequences["user_id"].to_numpy(), OOV)
    known = idx != OOV
    return np.bincount(idx[known], weights=per_row[known], minlength=data.vocabulary.user_vocab).astype(np.int64)


def item_train_counts(data: TrainingData) -> np.ndarray | None:
    """(item_vocab,) int64: events of each item_idx before the valid period (see :func:`train_counts`)."""
    counts = train_counts(data, kinds=("item",))
    return None if counts is None else counts["item"]


def rare_id_maps(counts: dict[str, np.ndarray], min_item_count: int, min_user_count: int) -> dict[str, np.ndarray]:
    """Vocabulary index -> embedding row per kind from :func:`train_counts` (models/id_rows.py):
    ids with fewer train-period events than the minimum read the shared OOV row."""
    from models.id_rows import rare_id_rows

    return {"item": rare_id_rows(counts["item"], min_item_count), "user": rare_id_rows(counts["user"], min_user_count)}


def warm_items(data: TrainingData) -> np.ndarray | None:
    """(item_vocab,) bool, True for items with events before the valid period: the one definition
    of a warm item (docs/DATA.md) that evaluation, validation and the floors share."""
    counts = item_train_counts(data)
    return None if counts is None else counts > 0


def resolved_model(config: ModelConfig, data: TrainingData) -> ModelConfig:
    """``config`` with the vocabulary sizes of the pinned lake (the tables must fit the ids)."""
    vocab = data.vocabulary
    sparse = dataclasses.replace(
        config.ranker.sparse, item_vocab=vocab.item_vocab, user_vocab=vocab.user_vocab, tag_vocab=vocab.tag_vocab
    )
    return dataclasses.replace(config, ranker=dataclasses.replace(config.ranker, sparse=sparse))
