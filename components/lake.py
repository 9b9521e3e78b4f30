"""Delta Lake helpers shared by the pipelines: table locations, the user-bucket hash,
the lake tables' schemas and run metadata (the contract of docs/DATA.md, here so that
writers in pipelines/ and readers in components/ share one definition) and atomic
read/write helpers. Distributed writes (workers write files, the driver commits) live in
components/lake_files.py, statistics from the transaction log in components/lake_stats.py.

Every write is one Delta commit: data files are written first and become visible only
when the commit lands in ``_delta_log``. A writer that dies before its commit leaves the
table at its previous version (the orphan files are never read and ``vacuum`` removes
them). Two writers racing on one table: Delta's optimistic concurrency lets appends both
commit, and rejects an overwrite whose input was changed underneath it; that rejection
is raised here as :class:`LakeWriteError`, naming the table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import deltalake
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from components.config_loader import ConfigError

logger = logging.getLogger(__name__)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)

# Vocabulary convention shared with components/transforms.py: 0 = padding, 1 = OOV.
FIRST_INDEX = 2


def check_lake_root(root: str) -> None:
    """ConfigError for a ``lake.root`` that is empty or a root: tables would land beside the
    system's own folders (an empty root used to write /items, /users and /events)."""
    if not root.strip():
        raise ConfigError("lake.root is empty; set a folder (e.g. lake) or an object-store URI (s3://bucket/lake)")
    if "://" in root:
        if not root.split("://", 1)[1].strip("/"):
            raise ConfigError(f"lake.root {root!r} names no bucket or folder; e.g. s3://bucket/lake")
        if root.startswith("file://") and os.path.abspath(root[len("file://") :] or "/") == "/":
            raise ConfigError(f"lake.root {root!r} is the root of the file system; set a folder such as lake")
    elif os.path.abspath(os.path.expanduser(root)) == "/":
        raise ConfigError(f"lake.root {root!r} is the root of the file system; set a folder such as lake")


@dataclass(frozen=True)
class LakeConfig:
    """The Delta Lake: a local folder or an object-store URI (s3://, gs://, abfss://)."""

    root: str = "lake"
    # Events and sequences are partitioned by ``bucket = hash(user_id) % num_buckets`` so every
    # per-user step is bucket-local (no shuffle), and a task's memory is one bucket's. 0 = auto:
    # enough buckets that each holds about ``events_per_bucket`` events (at least ``min_buckets``).
    num_buckets: int = 0
    events_per_bucket: int = 1_000_000
    min_buckets: int = 8
    # deltalake's object-store options (endpoint, credentials, region: AWS_ENDPOINT_URL, AWS_REGION,
    # ...); every stage passes them to every Delta read and write, also inside Ray tasks and to the
    # features job's data files (components/lake.py). Empty for a local folder.
    storage_options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_lake_root(self.root)
        if self.num_buckets < 0 or self.events_per_bucket < 1 or self.min_buckets < 1:
            raise ValueError(
                f"num_buckets must be >= 0 (0 = auto), events_per_bucket and min_buckets >= 1; "
                f"got {self.num_buckets}, {self.events_per_bucket}, {self.min_buckets}"
            )

    def buckets_for(self, num_events: int) -> int:
        """The bucket count used for ``num_events`` events (``num_buckets`` unless auto)."""
        if self.num_buckets:
            return self.num_buckets
        return max(self.min_buckets, -(-num_events // self.events_per_bucket))


EVENTS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("ts", pa.int64()),
        ("value", pa.float32()),
        ("bucket", pa.int32()),
    ]
)
ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("item_idx", pa.int32()),
        ("title", pa.string()),
        ("genre_mask", pa.int32()),
        ("year", pa.int16()),
        ("tag_ids", pa.list_(pa.int32())),
    ]
)
USERS_SCHEMA = pa.schema([("user_id", pa.int64()), ("user_idx", pa.int32())])
# Written by the features stage (pipelines/features.py), resolved by components/sequence_join.py.
SEQUENCES_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("bucket", pa.int32()),
        ("item_idx", pa.list_(pa.int32())),
        ("action", pa.list_(pa.int8())),
        ("ts", pa.list_(pa.int64())),
    ]
)
SAMPLES_SCHEMA = pa.schema(
    [
        ("group_id", pa.int64()),
        ("user_id", pa.int64()),
        ("user_idx", pa.int32()),
        ("bucket", pa.int32()),
        ("split", pa.string()),
        ("request_ts", pa.int64()),
        ("seq_end", pa.int32()),
        ("cand_item_idx", pa.list_(pa.int32())),
        ("label_engage", pa.list_(pa.int8())),
        ("label_like", pa.list_(pa.int8())),
        ("cand_genre_mask", pa.list_(pa.int32())),
        ("cand_year", pa.list_(pa.int16())),
        ("cand_tags", pa.list_(pa.int32())),
    ]
)
SEQUENCES_PARTITION = ["bucket"]
SAMPLES_PARTITION = ["split", "bucket"]


class LakeError(RuntimeError):
    """A Delta table could not be read or written; the message names the table."""


class LakeWriteError(LakeError):
    """A commit failed (e.g. a concurrent writer committed first); the table is unchanged."""


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


def lake_root(root: str) -> str:
    """Absolute local path (Arrow filesystems need one) or the object-store URI unchanged."""
    return root if "://" in root else os.path.abspath(root)


def table_uri(root: str, name: str) -> str:
    """Location of table ``name`` under the lake root (local folder or object-store URI)."""
    return f"{root.rstrip('/')}/{name}"


def run_metadata(
    job_id: str,
    ingest: Mapping[str, str],
    max_seq_len: int,
    candidates_per_group: int,
    cutoffs: tuple[int, int],
) -> dict[str, str]:
    """Commit info of BOTH output tables of one features run (docs/DATA.md): how the loader
    pairs ``samples`` with the ``sequences`` of the same run and learns the run's settings.

    ``ingest`` records the input triple (``IngestSnapshot.metadata()`` of
    components/ingest_runs.py: ingest run id and the items/users/events versions read);
    ``cutoffs`` the split boundaries (valid_start_ts, test_start_ts): an item is warm when it
    has an event before valid_start_ts."""
    return {
        "job_id": job_id,
        **ingest,
        "max_seq_len": str(max_seq_len),
        "candidates_per_group": str(candidates_per_group),
        "valid_start_ts": str(cutoffs[0]),
        "test_start_ts": str(cutoffs[1]),
    }


# ---------------------------------------------------------------- table builders


def events_table(
    user_id: np.ndarray, item_id: np.ndarray, ts: np.ndarray, value: np.ndarray, num_buckets: int
) -> pa.Table:
    """Events in EVENTS_SCHEMA, sorted by (bucket, user_id, ts, item_id).

    The sort makes the table's content a pure function of its input (idempotent re-runs
    write identical data) and gives every file tight user/ts statistics.
    """
    user_id = np.asarray(user_id, np.int64)
    bucket = user_bucket(user_id, num_buckets)
    table = pa.table(
        {
            "user_id": user_id,
            "item_id": np.asarray(item_id, np.int64),
            "ts": np.asarray(ts, np.int64),
            "value": np.asarray(value, np.float32),
            "bucket": bucket,
        },
        schema=EVENTS_SCHEMA,
    )
    keys = [("bucket", "ascending"), ("user_id", "ascending"), ("ts", "ascending"), ("item_id", "ascending")]
    return table.take(pc.sort_indices(table, sort_keys=keys))


def items_table(
    item_id: np.ndarray,
    genre_mask: np.ndarray,
    year: np.ndarray,
    tag_ids: Sequence[Sequence[int]] | pa.Array,
    title: Sequence[str | None] | pa.Array | None = None,
) -> pa.Table:
    """Items in ITEMS_SCHEMA: sorted by item_id, ``item_idx = 2 + rank`` (0 pad, 1 OOV).

    Raises ValueError on duplicate item ids (the vocabulary must be a bijection).
    """
    item_id = np.asarray(item_id, np.int64)
    n = len(item_id)
    if title is None:
        title = pa.nulls(n, pa.string())
    table = pa.table(
        {
            "item_id": item_id,
            "item_idx": np.zeros(n, np.int32),
            "title": pa.array(title, pa.string()),
            "genre_mask": np.asarray(genre_mask, np.int32),
            "year": np.asarray(year, np.int16),
            "tag_ids": pa.array(tag_ids, pa.list_(pa.int32())),
        },
        schema=ITEMS_SCHEMA,
    )
    table = table.take(pc.sort_indices(table["item_id"]))
    sorted_ids = table["item_id"].to_numpy()
    if n > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
        dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0]
        raise ValueError(f"duplicate item_id {dup} in the items table")
    idx = pa.array(np.arange(FIRST_INDEX, n + FIRST_INDEX, dtype=np.int32))
    return table.set_column(1, "item_idx", idx)


def users_table(user_ids: np.ndarray) -> pa.Table:
    """Users in USERS_SCHEMA: unique ids sorted, ``user_idx = 2 + rank`` (0 pad, 1 OOV)."""
    unique = np.unique(np.asarray(user_ids, np.int64))
    idx = np.arange(FIRST_INDEX, len(unique) + FIRST_INDEX, dtype=np.int32)
    return pa.table({"user_id": unique, "user_idx": idx}, schema=USERS_SCHEMA)


# ---------------------------------------------------------------- Delta I/O
# Every function that touches a table takes ``storage_options`` (``lake.storage_options`` of
# the pipeline config: endpoint, credentials, region of an object store), and every stage
# passes it on, also into Ray tasks: deltalake never sees a lake without them.


def deltalake_options(storage_options: Mapping[str, str] | None) -> dict[str, str] | None:
    """``storage_options`` as deltalake takes them (None for a local lake without options)."""
    return dict(storage_options) if storage_options else None


def commit_properties(custom_metadata: Mapping[str, str] | None, is_overwrite: bool) -> deltalake.CommitProperties:
    """Commit properties of a write: its custom metadata and, for an overwrite, NO retries.

    deltalake retries a conflicting commit on top of the version that won. An overwrite
    (or the creation of a table, which is one) must replace exactly the version it read:
    retried, it removes only the files it saw, so a retried creation removes nothing and the
    table holds both writers' rows (measured: two racing creators, both exit 0, 2x the rows).
    Appends commute and keep deltalake's retries.
    """
    return deltalake.CommitProperties(
        custom_metadata=dict(custom_metadata) if custom_metadata else None,
        max_commit_retries=0 if is_overwrite else None,
    )


def commit_conflict(uri: str, exc: CommitFailedError, is_creating: bool) -> LakeWriteError:
    """The error of a commit that lost a race; says whether the table was being created."""
    first_line = str(exc).splitlines()[0]
    if is_creating:
        return LakeWriteError(
            f"Delta table {uri} was created by a concurrent writer while this one was creating it; "
            f"this write was not committed, the table holds the other writer's version ({first_line})"
        )
    return LakeWriteError(
        f"commit to Delta table {uri} failed, table unchanged (a concurrent writer committed first?): {first_line}"
    )


def write_table(
    uri: str,
    data: pa.Table | pa.RecordBatchReader,
    mode: Literal["overwrite", "append", "error"] = "overwrite",
    partition_by: Sequence[str] | None = None,
    storage_options: Mapping[str, str] | None = None,
    custom_metadata: Mapping[str, str] | None = None,
    target_file_size: int | None = None,
) -> int:
    """Write ``data`` to the Delta table at ``uri`` as ONE commit; return the new version.

    ``overwrite`` replaces content, schema and partitioning in one atomic version, so a
    re-run is idempotent. A reader (``pa.RecordBatchReader``) is streamed: files are
    written as batches arrive and nothing is visible before the final commit. Creating a
    table is as safe as overwriting one: of two writers racing to create it, exactly one
    commits and the other raises :class:`LakeWriteError`.
    """
    is_creating = table_version(uri, storage_options) is None
    try:
        deltalake.write_deltalake(
            uri,
            data,
            mode=mode,
            partition_by=list(partition_by) if partition_by else None,
            schema_mode="overwrite" if mode == "overwrite" else None,
            storage_options=deltalake_options(storage_options),
            commit_properties=commit_properties(custom_metadata, is_overwrite=mode != "append" or is_creating),
            target_file_size=target_file_size,
        )
    except CommitFailedError as exc:
        raise commit_conflict(uri, exc, is_creating) from exc
    except OSError as exc:  # e.g. an object store without credentials or endpoint in storage_options
        raise LakeError(f"cannot write Delta table {uri} (lake.storage_options?): {str(exc).splitlines()[0]}") from exc
    version = table_version(uri, storage_options)
    assert version is not None
    logger.info("wrote %s (mode=%s) -> version %d", uri, mode, version)
    return version


def open_table(
    uri: str, version: int | None = None, storage_options: Mapping[str, str] | None = None
) -> deltalake.DeltaTable:
    """The Delta table at ``uri`` (a ``version``, default the latest); LakeError naming it when absent."""
    try:
        return deltalake.DeltaTable(uri, version=version, storage_options=deltalake_options(storage_options))
    except TableNotFoundError as exc:
        raise LakeError(f"no Delta table at {uri} (run the ingest stage first?)") from exc
    except Exception as exc:  # deltalake raises plain errors for a missing version
        raise LakeError(f"cannot open Delta table {uri} at version {version}: {exc}") from exc


def read_table(
    uri: str,
    version: int | None = None,
    columns: Sequence[str] | None = None,
    filters: pc.Expression | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> pa.Table:
    """Read a Delta table (optionally an older ``version``, some ``columns``, a row filter)."""
    table = open_table(uri, version, storage_options)
    dataset = table.to_pyarrow_dataset()
    return dataset.to_table(columns=list(columns) if columns else None, filter=filters)


def table_version(uri: str, storage_options: Mapping[str, str] | None = None) -> int | None:
    """Current version of the Delta table at ``uri``; None when there is no table."""
    try:
        exists = deltalake.DeltaTable.is_deltatable(uri, storage_options=deltalake_options(storage_options))
    except OSError as exc:  # e.g. an object store without credentials or endpoint in storage_options
        raise LakeError(f"cannot reach Delta table {uri} (lake.storage_options?): {str(exc).splitlines()[0]}") from exc
    if not exists:
        return None
    return open_table(uri, storage_options=storage_options).version()


@dataclass(frozen=True)
class PinnedTable:
    """One version of one Delta table and how to reach it: what a Ray task needs to read it.

    It carries the storage options, so a task given the table cannot read it without them.
    """

    uri: str
    version: int
    storage_options: dict[str, str] = field(default_factory=dict)

    def read(self, columns: Sequence[str] | None = None, filters: pc.Expression | None = None) -> pa.Table:
        """The pinned version's rows (some ``columns``, a row filter)."""
        return read_table(self.uri, self.version, columns, filters, self.storage_options)

    def partition_columns(self) -> list[str]:
        """Partition columns, from the Delta log."""
        return list(open_table(self.uri, self.version, self.storage_options).metadata().partition_columns)

    def partition_values(self, column: str, filters: list[tuple[str, str, str]] | None = None) -> list[str]:
        """Distinct values of partition ``column`` among the files (only those of the partitions
        matching ``filters``, e.g. ``[("split", "=", "train")]``); from the log, no data read."""
        return sorted({p[column] for p in open_table(self.uri, self.version, self.storage_options).partitions(filters)})


def pin_table(
    uri: str, storage_options: Mapping[str, str] | None = None, hint: str = "run the ingest stage first"
) -> PinnedTable:
    """The table at ``uri`` at its current version; LakeError naming it (and ``hint``) when absent."""
    version = table_version(uri, storage_options)
    if version is None:
        raise LakeError(f"no Delta table at {uri} ({hint})")
    return PinnedTable(uri, version, dict(storage_options or {}))


def commit_metadata(
    uri: str, version: int | None = None, storage_options: Mapping[str, str] | None = None
) -> dict[str, str]:
    """String fields of a commit's info (default: the latest), including the custom metadata
    that ``write_table(custom_metadata=...)`` stored, e.g. the items table's ``genres``."""
    table = open_table(uri, storage_options=storage_options)
    target = table.version() if version is None else version
    for entry in table.history():
        if entry.get("version") == target:
            return {k: v for k, v in entry.items() if isinstance(v, str)}
    return {}


def find_version(
    uri: str, key: str, value: str, max_version: int | None = None, storage_options: Mapping[str, str] | None = None
) -> int | None:
    """Newest version (<= ``max_version`` when given) whose commit info has ``key == value``.

    Walks the table history in the Delta log (no data read); None when no commit matches,
    e.g. the matching commit was never made or its log entry has been cleaned up.
    """
    matches = [
        int(entry["version"])
        for entry in open_table(uri, storage_options=storage_options).history()
        if entry.get(key) == value and entry.get("version") is not None
    ]
    matches = [v for v in matches if max_version is None or v <= max_version]
    return max(matches) if matches else None
