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
    )


def item_train_counts(data: TrainingData) -> np.ndarray | None:
    """(item_vocab,) int64: events of each item_idx before the valid period, from the pinned
    ``sequences`` (every event is in exactly one user's sequence); None when the lake records no
    cut-off. ``> 0`` is the warm mask of evaluation (components/metrics.py)."""
    if data.valid_start_ts is None:
        return None
    sequences = lake.PinnedTable(
        lake.table_uri(data.lake_root, "sequences"), data.sequences_version, data.storage_options
    )
    table = sequences.read(["item_idx", "ts"])
    items = pc.list_flatten(table["item_idx"]).to_numpy()
    ts = pc.list_flatten(table["ts"]).to_numpy()
    return np.bincount(items[ts < data.valid_start_ts], minlength=data.vocabulary.item_vocab).astype(np.int64)


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
