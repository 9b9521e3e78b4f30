"""Distributed writes to a Delta table: Ray workers write the data files, the driver makes ONE commit.

Split from components/lake.py (one concept per file): :func:`write_data_file` runs in a
worker and returns the file's metadata; :func:`commit_files_overwrite` turns the files of
every worker into one atomic overwrite. Until that commit lands nothing is visible, so a
job that dies half-way leaves the table at its previous version (the orphan files are
never read and ``vacuum`` removes them).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake.exceptions import CommitFailedError
from deltalake.fs import DeltaStorageHandler

from components.lake import commit_conflict, commit_properties, deltalake_options, open_table, table_version

logger = logging.getLogger(__name__)


def _table_filesystem(table_uri: str, storage_options: Mapping[str, str] | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) of the table's files.

    A local table uses Arrow's native filesystem (``table_uri`` must be absolute: see
    :func:`lake_root`). An object-store table goes through deltalake's own object store, so
    the data files are written with exactly the ``storage_options`` that its commits use:
    any store and any option deltalake accepts (s3://, gs://, abfss://; endpoint,
    credentials, region, ...), with no second translation into Arrow's S3/GCS/Azure options.
    That handler is Python-level and keeps the GIL while it waits on the store: fine for a
    Ray task writing its bucket's files, not worth it for a local folder.
    """
    if "://" not in table_uri or table_uri.startswith("file://"):
        return pafs.FileSystem.from_uri(table_uri)
    return pafs.PyFileSystem(DeltaStorageHandler(table_uri, deltalake_options(storage_options))), ""


def write_data_file(
    table: pa.Table,
    table_uri: str,
    partition: dict[str, str],
    name: str,
    storage_options: Mapping[str, str] | None = None,
) -> dict:
    """Write one data file of a Delta table (partition columns live in the path, not the file)."""
    fs, root = _table_filesystem(table_uri, storage_options)
    rel_dir = "/".join(f"{k}={v}" for k, v in partition.items())
    rel_path = f"{rel_dir}/{name}.parquet" if rel_dir else f"{name}.parquet"
    in_table = lambda rel: f"{root}/{rel}" if root else rel
    folder = in_table(rel_dir) if rel_dir else root
    if folder:  # an object store has no folders to make
        fs.create_dir(folder, recursive=True)
    pq.write_table(table.drop_columns(list(partition)), in_table(rel_path), filesystem=fs)
    return {
        "path": rel_path,
        "size": fs.get_file_info(in_table(rel_path)).size,
        "partition": json.dumps(partition),
        "num_rows": table.num_rows,
    }


def _add_actions(parts: list[dict]) -> list:
    """Delta add actions of files written by :func:`write_data_file` (record counts as stats)."""
    from deltalake.transaction import AddAction

    now_ms = int(time.time() * 1000)
    return [
        AddAction(
            p["path"],
            int(p["size"]),
            json.loads(p["partition"]),
            now_ms,
            True,
            json.dumps({"numRecords": int(p["num_rows"])}),
        )
        for p in parts
    ]


def commit_files_overwrite(
    table_uri: str,
    schema: pa.Schema,
    partition_by: list[str],
    parts: list[dict],
    custom_metadata: Mapping[str, str] | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> int:
    """ONE atomic Delta commit replacing the table's content with ``parts``; returns the version.

    ``custom_metadata`` lands in the commit's info (read it back with :func:`commit_metadata`
    or :func:`find_version`), e.g. the id of the job that wrote the files. The commit never
    retries onto a version it did not see, so every version holds ONE job's files: of two
    jobs racing to overwrite the table, the loser raises :class:`LakeWriteError`; racing to
    create it, the loser raises too, or deltalake's create-or-replace makes its version
    replace the winner's whole (tests/components/test_lake.py races both).
    """
    from deltalake import Schema
    from deltalake.transaction import create_table_with_add_actions

    actions = _add_actions(parts)
    is_creating = table_version(table_uri, storage_options) is None
    commit = commit_properties(custom_metadata, is_overwrite=True)  # no retry: see lake.commit_properties
    try:
        if not is_creating:
            open_table(table_uri, storage_options=storage_options).create_write_transaction(
                actions, mode="overwrite", schema=schema, partition_by=partition_by, commit_properties=commit
            )
        else:
            create_table_with_add_actions(
                table_uri,
                Schema.from_arrow(schema),
                actions,
                mode="overwrite",
                partition_by=partition_by,
                storage_options=deltalake_options(storage_options),
                commit_properties=commit,
            )
    except CommitFailedError as exc:
        raise commit_conflict(table_uri, exc, is_creating) from exc
    version = table_version(table_uri, storage_options)
    logger.info("committed %d file(s) to %s -> version %s", len(actions), table_uri, version)
    return int(version)
