"""Loader side of the samples contract: resolve each group's sequence reference into lists.

A sample row holds ``(user_id, seq_end)``; its behaviour sequence is the last ``max_seq_len``
events of that user's ``sequences`` row before position ``seq_end`` (docs/DATA.md). Storing the
reference instead of a copy keeps the samples table linear in the history length; this module
materialises the slices bucket by bucket, so memory is bounded by one bucket's sequences
plus one output block, never by the number of users or groups.

Resolved rows carry every sample column plus ``seq_item_idx``, ``seq_action``, ``seq_ts``
(oldest first), the input of ``components.collate``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components import lake

logger = logging.getLogger(__name__)

SEQUENCE_COLUMNS = {"item_idx": "seq_item_idx", "action": "seq_action", "ts": "seq_ts"}


class SequenceJoinError(ValueError):
    """Samples and sequences do not fit together; the message names the user and the field."""


def _list_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(absolute offsets into ``values``, values) of a list column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.offsets.to_numpy().astype(np.int64), array.values


def _user_rows(samples: pa.Table, sequences: pa.Table) -> np.ndarray:
    """Row of ``sequences`` for every sample's user (error naming a user without a sequence)."""
    seq_users = sequences["user_id"].to_numpy()
    order = np.argsort(seq_users, kind="stable")
    sorted_users = seq_users[order]
    if sorted_users.size > 1 and np.any(sorted_users[1:] == sorted_users[:-1]):
        dup = sorted_users[1:][sorted_users[1:] == sorted_users[:-1]][0]
        raise SequenceJoinError(f"sequences has more than one row for user_id {dup}")
    wanted = samples["user_id"].to_numpy()
    pos = np.minimum(np.searchsorted(sorted_users, wanted), max(sorted_users.size - 1, 0))
    found = sorted_users[pos] == wanted if sorted_users.size else np.zeros(wanted.size, bool)
    if not found.all():
        raise SequenceJoinError(f"no sequence for user_id {wanted[~found][0]} (sample rows reference it)")
    return order[pos]


def resolve_sequences(samples: pa.Table, sequences: pa.Table, max_seq_len: int) -> pa.Table:
    """Sample rows + the sequences of their users -> rows with ``seq_*`` lists.

    Row i gets ``sequences.*[max(0, seq_end - max_seq_len) : seq_end]`` of its user, so every
    event in it is strictly before the row's request (seq_end counts exactly those events).
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    for name, table, cols in (
        ("samples", samples, ("user_id", "seq_end")),
        ("sequences", sequences, ("user_id", *SEQUENCE_COLUMNS)),
    ):
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise SequenceJoinError(f"{name} is missing column(s) {missing}; has {table.column_names}")
    seq_end = samples["seq_end"].to_numpy().astype(np.int64)
    if samples.num_rows == 0:
        rows = np.empty(0, np.int64)
    else:
        rows = _user_rows(samples, sequences)
    length = np.minimum(seq_end, max_seq_len)  # events kept per row
    out_offsets = pa.array(np.concatenate([[0], np.cumsum(length)]), pa.int32())
    resolved = samples
    for src, dst in SEQUENCE_COLUMNS.items():
        offsets, values = _list_parts(sequences[src])
        available = offsets[rows + 1] - offsets[rows]
        bad = (seq_end < 0) | (seq_end > available)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SequenceJoinError(
                f"seq_end {seq_end[i]} of user_id {samples['user_id'][i].as_py()} is outside its "
                f"sequence of {available[i]} events ({src})"
            )
        start = offsets[rows] + seq_end - length  # first kept event per row
        take = np.repeat(start - (out_offsets.to_numpy()[:-1]), length) + np.arange(int(length.sum()))
        resolved = resolved.append_column(
            dst, pa.ListArray.from_arrays(out_offsets, values.take(pa.array(take, pa.int64())))
        )
    return resolved


# ---------------------------------------------------------------------------------------------
# Ray Data: per-bucket resolution
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitJob:
    """What every bucket task of :func:`load_groups` reads: the two pinned tables of one run."""

    samples: lake.PinnedTable
    sequences: lake.PinnedTable
    split: str
    max_seq_len: int
    rows_per_block: int


def _resolve_bucket(batch: dict[str, np.ndarray], job: SplitJob) -> Iterator[pa.Table]:
    """Ray Data UDF: one bucket's samples of a split, resolved in blocks of ``rows_per_block``."""
    for bucket in batch["bucket"].tolist():
        bucket_filter = pc.field("bucket") == pa.scalar(bucket, pa.int32())
        samples = job.samples.read(filters=bucket_filter & (pc.field("split") == job.split))
        sequences = job.sequences.read(["user_id", *SEQUENCE_COLUMNS], bucket_filter)
        for start in range(0, samples.num_rows, job.rows_per_block):
            part = samples.slice(start, job.rows_per_block)
            yield resolve_sequences(part, sequences, job.max_seq_len)


def pinned_versions(
    root: str, storage_options: Mapping[str, str] | None = None, samples_version: int | None = None
) -> tuple[int, int, dict[str, str]]:
    """(samples version, sequences version of the SAME features run, the samples commit info).

    The newest ``samples`` version (or ``samples_version``: a resumed training run keeps the
    version it started on) is pinned and its ``job_id`` looked up in the ``sequences`` history
    (pipelines/features.py records it in both commits). Two overlapping features runs,
    or a run that died between its two commits, leave the latest versions of the two tables
    from different runs; resolving one run's (user, seq_end) against another run's sequences
    would silently slice the wrong events (possibly from after the request).
    """
    samples_uri, sequences_uri = lake.table_uri(root, "samples"), lake.table_uri(root, "sequences")
    latest = lake.table_version(samples_uri, storage_options)
    sequences_latest = lake.table_version(sequences_uri, storage_options)
    if latest is None or sequences_latest is None:
        raise lake.LakeError(f"no samples/sequences tables under {root} (run the features stage first)")
    if samples_version is None:
        samples_version = latest
    elif not 0 <= samples_version <= latest:
        raise lake.LakeError(f"samples table {samples_uri} has no version {samples_version} (latest is {latest})")
    info = lake.commit_metadata(samples_uri, samples_version, storage_options)
    job_id = info.get("job_id")
    if job_id is None:
        raise lake.LakeError(
            f"samples table {samples_uri} version {samples_version} records no job_id "
            f"in its commit info, so the matching sequences table {sequences_uri} version "
            "is unknown (re-run the features stage)"
        )
    sequences_version = lake.find_version(sequences_uri, "job_id", job_id, storage_options=storage_options)
    if sequences_version is None:
        raise lake.LakeError(
            f"samples table {samples_uri} version {samples_version} was written by features "
            f"job {job_id}, but no version of the sequences table {sequences_uri} was "
            "(a run crashed or overlapped another, or the log was cleaned; re-run features)"
        )
    if sequences_version != sequences_latest:
        logger.warning(
            "sequences %s: latest version %d is from another features run; using version %d "
            "(job %s) to match samples version %d",
            sequences_uri,
            sequences_latest,
            sequences_version,
            job_id,
            samples_version,
        )
    return samples_version, sequences_version, info


def load_groups(
    lake_root: str,
    split: str,
    max_seq_len: int | None = None,
    rows_per_block: int = 1024,
    storage_options: Mapping[str, str] | None = None,
    samples_version: int | None = None,
):
    """Ray Dataset of resolved group rows of ``split`` (train/valid/test), one bucket per task.

    Sequences are truncated HERE (the features job stores full histories): each row keeps
    the last ``max_seq_len`` events before its request. ``None`` means the value the features
    run recorded in the samples commit (``features.max_seq_len``); an explicit value wins.
    Table versions are pinned when this is called, ``samples`` at its latest version and
    ``sequences`` at the version written by the same features run (:func:`pinned_versions`),
    so neither a concurrent nor a half-finished features run can mix two runs into one epoch.
    ``storage_options`` (``lake.storage_options``) reach every read, also in the Ray tasks.
    ``samples_version`` pins an older features run (a resumed training run keeps its data).
    """
    import ray

    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be one of train/valid/test, got {split!r}")
    root = lake.lake_root(lake_root)
    samples_version, sequences_version, info = pinned_versions(root, storage_options, samples_version)
    options = dict(storage_options or {})
    samples = lake.PinnedTable(lake.table_uri(root, "samples"), samples_version, options)
    if max_seq_len is None:
        if "max_seq_len" not in info:
            raise lake.LakeError(
                f"samples table {samples.uri} version {samples_version} records no "
                "max_seq_len; pass max_seq_len to load_groups"
            )
        max_seq_len = int(info["max_seq_len"])
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    buckets = sorted(int(b) for b in samples.partition_values("bucket", [("split", "=", split)]))
    logger.debug(
        "split %s: samples v%d, sequences v%d, %d buckets", split, samples_version, sequences_version, len(buckets)
    )
    if not buckets:
        raise lake.LakeError(f"samples table {samples.uri} has no rows of split {split!r}")
    sequences = lake.PinnedTable(lake.table_uri(root, "sequences"), sequences_version, options)
    job = SplitJob(samples, sequences, split, max_seq_len, rows_per_block)
    return ray.data.from_items([{"bucket": b} for b in buckets], override_num_blocks=len(buckets)).map_batches(
        _resolve_bucket, batch_size=1, batch_format="numpy", fn_kwargs={"job": job}
    )
