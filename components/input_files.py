r"""Reading one input file (CSV or Parquet) with errors that name the file and the column.

Used by every ingest source (components/ingest_sources.py): a missing, empty or unreadable
file, a duplicated header name and a missing column are :class:`InputFileError`\ s, never
tracebacks; id columns are read as text so they can be parsed exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from components.validation import InputFileError


def _format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    return "parquet" if suffixes and suffixes[-1] in (".parquet", ".pq") else "csv"


def _csv_options(column_types: dict[str, pa.DataType] | None = None) -> pacsv.ConvertOptions:
    # Empty cells are missing values (null), also in text columns (titles, genres).
    return pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=True)


def read_file(
    path: str | Path, fmt: str = "auto", text_columns: Sequence[str] = (), id_columns: Sequence[str] = ()
) -> pa.Table:
    """Read a CSV or Parquet file; a clear InputFileError when missing, empty or unreadable.

    CSV ``id_columns`` are always read as text and parsed as integers later: type inference
    would make the whole column float64 for one "1.0" cell and round every id above 2^53.
    A CSV whose type inference breaks on a late bad cell (e.g. "abc" in a value column at
    row 1e6) is re-read with ``text_columns`` as text, so the bad cell becomes one rejected
    row instead of a failed run.
    """
    p, name = Path(path), str(path)
    if not p.is_file():
        raise InputFileError(name, "file not found")
    if p.stat().st_size == 0:
        raise InputFileError(name, "file is empty")
    kind = _format(p, fmt)
    as_text = dict.fromkeys(id_columns, pa.string())
    try:
        if kind == "parquet":
            table = pq.read_table(p)
        else:
            try:
                table = pacsv.read_csv(p, convert_options=_csv_options(as_text))
            except pa.ArrowInvalid as exc:
                if "conversion error" not in str(exc) or not text_columns:
                    raise
                types = as_text | dict.fromkeys(text_columns, pa.string())
                table = pacsv.read_csv(p, convert_options=_csv_options(types))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputFileError(name, f"cannot read as {kind}: {str(exc).splitlines()[0]}") from exc
    if table.num_rows == 0:
        raise InputFileError(name, "file has no data rows")
    check_unique_columns(table, name)
    return table


def check_unique_columns(table: pa.Table, path: str) -> None:
    """InputFileError naming the first column name the header holds more than once."""
    names = table.column_names
    for column in names:
        if names.count(column) > 1:
            raise InputFileError(path, f"the header names this column {names.count(column)} times ({names})", column)


_OPTIONAL_COLUMN_KEYS = {"value_col", "item_genres_col", "item_year_col", "item_title_col"}


def require_columns(table: pa.Table, columns: Mapping[str | None, str | None], path: str) -> None:
    """InputFileError naming the first required column the file lacks.

    ``columns`` maps each column (None = not configured, skipped) to the config key that
    names it, so the message can say which setting to change.
    """
    for column, key in columns.items():
        if column is not None and column not in table.column_names:
            # Only optional columns (their config type admits None) can be switched off.
            optional = key is not None and key.rsplit(".", 1)[-1] in _OPTIONAL_COLUMN_KEYS
            hint = f"; set {key}" + (" (null if the file has no such column)" if optional else "") if key else ""
            raise InputFileError(path, f"column not found (file has {table.column_names}){hint}", column)
