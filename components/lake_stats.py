"""Statistics of a Delta table read from its transaction log alone (no data files).

Delta keeps per-file record counts and column min/max in the log, so row counts and value
ranges cost one log read at any table size; a scan is the fallback for files without them.
Split from components/lake.py, whose :func:`~components.lake.open_table` these use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc

from components.lake import open_table

logger = logging.getLogger(__name__)


def column_range(
    uri: str,
    column: str,
    version: int | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> tuple[int | float, int | float] | None:
    """(min, max) of a numeric column from the Delta log's file statistics; None if empty.

    Reads only the transaction log (no data files) when every file has statistics, so it
    is cheap at any table size; falls back to scanning the column otherwise.
    """
    table = open_table(uri, version, storage_options)
    actions = pa.table(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return None
    lo_col, hi_col = f"min.{column}", f"max.{column}"
    names = actions.column_names
    if lo_col in names and hi_col in names and actions[lo_col].null_count == 0:
        lo, hi = pc.min(actions[lo_col]).as_py(), pc.max(actions[hi_col]).as_py()
        return lo, hi
    logger.info("no statistics for %s in %s; scanning the column", column, uri)
    values = table.to_pyarrow_dataset().to_table(columns=[column])[column]
    if len(values) == values.null_count:
        return None
    bounds = pc.min_max(values)
    return bounds["min"].as_py(), bounds["max"].as_py()


def events_time_range(
    uri: str, version: int | None = None, storage_options: Mapping[str, str] | None = None
) -> tuple[int, int] | None:
    """(first ts, last ts) of the events table in seconds, from the Delta log only."""
    bounds = column_range(uri, "ts", version, storage_options)
    return None if bounds is None else (int(bounds[0]), int(bounds[1]))


def row_count(uri: str, version: int | None = None, storage_options: Mapping[str, str] | None = None) -> int:
    """Number of rows of a Delta table, from the log's per-file record counts."""
    table = open_table(uri, version, storage_options)
    actions = pa.table(table.get_add_actions(flatten=True))
    if "num_records" in actions.column_names and actions["num_records"].null_count == 0:
        return int(pc.sum(actions["num_records"]).as_py() or 0)
    return table.to_pyarrow_dataset().count_rows()
