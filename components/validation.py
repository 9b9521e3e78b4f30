"""Validation of raw input: column coercion with clear file/column errors, and row checks.

Two kinds of bad input, handled differently:
- a bad FILE (unknown path, empty, a missing column, a column of the wrong type) raises
  :class:`InputFileError` naming the file and the column — nothing is written;
- bad ROWS (null or negative ids, unparseable or absurd timestamps, NaN or out-of-range
  values) are dropped, counted by reason, and a few are logged. When the rejected fraction
  is above ``ingest.max_reject_frac`` the run fails with :class:`RejectThresholdError`
  before any table is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

# Timestamps outside [1970-01-01, 2200-01-01) are rejected: usually ms read as s or vice versa.
TS_MIN_S = 0
TS_MAX_S = 7_258_118_400

# Row checks in order; a row is counted under the FIRST reason it fails.
REASONS = (
    "invalid_user_id",
    "negative_user_id",
    "invalid_item_id",
    "negative_item_id",
    "invalid_ts",
    "ts_out_of_range",
    "invalid_value",
    "value_out_of_range",
)
RAW_EVENT_COLUMNS = ("user_id", "item_id", "ts", "value")


class IngestError(Exception):
    """Base of the ingest stage's own errors (bad input, too many rejected rows)."""


class InputFileError(IngestError):
    """An input file is missing, empty or malformed; names the file and the column."""

    def __init__(self, path: str, message: str, column: str | None = None) -> None:
        where = f"{path}" + (f", column {column!r}" if column else "")
        super().__init__(f"{where}: {message}")
        self.path, self.column = path, column


class RejectThresholdError(IngestError):
    """Too many rows failed validation; nothing was written."""


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of ``validate_events``: counts by reason and a few sample rows."""

    total_rows: int
    rejected: dict[str, int] = field(default_factory=dict)
    samples: tuple[str, ...] = ()

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def reject_frac(self) -> float:
        return self.num_rejected / self.total_rows if self.total_rows else 0.0

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in self.rejected.items() if v) or "none"
        return f"{self.num_rejected}/{self.total_rows} rows rejected ({self.reject_frac:.2%}); by reason: {reasons}"


# ---------------------------------------------------------------- column coercion


def _flat(values: pa.ChunkedArray | pa.Array) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _preview(values: pa.ChunkedArray | pa.Array, limit: int = 3) -> str:
    sample = pc.drop_null(values).slice(0, limit).to_pylist()
    return ", ".join(repr(v) for v in sample)


def _text_to(values: pa.ChunkedArray | pa.Array, dtype: pl.DataType) -> pa.Array:
    """Parse text to numbers; unparseable cells become null (counted as invalid rows)."""
    series = pl.from_arrow(_flat(values).cast(pa.large_string()))
    return series.str.strip_chars().cast(dtype, strict=False).to_arrow()


def _check_some_parsed(
    raw: pa.ChunkedArray | pa.Array, parsed: pa.Array, path: str, column: str, expected: str
) -> None:
    # Every non-empty cell unparseable = the column is of the wrong kind, not a few bad rows.
    if len(raw) > raw.null_count and len(parsed) == parsed.null_count:
        raise InputFileError(path, f"expected {expected}, got values like {_preview(raw)}", column)


def coerce_ids(values: pa.ChunkedArray | pa.Array, path: str, column: str) -> pa.Array:
    """Id column -> int64 with null where a cell is not an integer (negatives kept for checks)."""
    tp = values.type
    if pa.types.is_integer(tp) or pa.types.is_null(tp):
        return _flat(pc.cast(values, pa.int64(), safe=False))
    if pa.types.is_floating(tp):
        as_float = pc.cast(values, pa.float64())
        integral = pc.and_(pc.is_finite(as_float), pc.equal(pc.floor(as_float), as_float))
        out = pc.if_else(integral, as_float, pa.scalar(None, pa.float64()))
        return _flat(pc.cast(out, pa.int64()))
    if pa.types.is_string(tp) or pa.types.is_large_string(tp):
        parsed = _text_to(values, pl.Int64)
        _check_some_parsed(values, parsed, path, column, "integer ids")
        return parsed.cast(pa.int64())
    raise InputFileError(path, f"expected integer ids, got column type {tp}", column)


def coerce_values(values: pa.ChunkedArray | pa.Array, path: str, column: str) -> pa.Array:
    """Value column -> float64 (null where unparseable; NaN kept for the row checks)."""
    tp = values.type
    if pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_null(tp):
        return _flat(pc.cast(values, pa.float64()))
    if pa.types.is_string(tp) or pa.types.is_large_string(tp):
        parsed = _text_to(values, pl.Float64)
        _check_some_parsed(values, parsed, path, column, "numbers")
        return parsed.cast(pa.float64())
    raise InputFileError(path, f"expected numbers, got column type {tp}", column)


def _parse_iso(values: pa.ChunkedArray | pa.Array) -> pa.Array:
    """ISO-8601 text -> seconds since epoch (UTC when no offset is given); null if unparseable."""
    text = pl.from_arrow(_flat(values).cast(pa.large_string())).str.strip_chars()
    out = pl.Series([None] * len(text), dtype=pl.Int64)
    # Polars infers ONE format per call; a second pass over the leftovers catches files
    # mixing e.g. dates and date-times.
    for _ in range(3):
        todo = out.is_null() & text.is_not_null()
        if not todo.any():
            break
        parsed = text.filter(todo).str.to_datetime(strict=False, time_unit="ms", time_zone="UTC")
        if parsed.null_count() == len(parsed):
            break
        out = out.scatter(todo.arg_true(), parsed.dt.epoch("s"))
    return out.to_arrow().cast(pa.int64())


def coerce_ts(values: pa.ChunkedArray | pa.Array, unit: str, path: str, column: str) -> pa.Array:
    """Timestamp column -> int64 seconds since epoch; null where unparseable.

    Fractional seconds (float or text numbers) are floored to the second, as event
    order within a second is not kept anyway (ties are ordered by item id downstream).

    ``unit`` is "s" or "ms" for numbers, "iso" for text. Native Arrow timestamp/date
    columns (Parquet) are converted whatever the unit says.
    """
    tp = values.type
    if pa.types.is_timestamp(tp) or pa.types.is_date(tp):
        as_ts = pc.cast(values, pa.timestamp("s", tz=getattr(tp, "tz", None)))
        return _flat(pc.cast(as_ts, pa.int64()))
    is_text = pa.types.is_string(tp) or pa.types.is_large_string(tp)
    if unit == "iso":
        if not (is_text or pa.types.is_null(tp)):
            raise InputFileError(
                path, f"ts_unit is 'iso' but the column is {tp}; use ts_unit 's' or 'ms' for numbers", column
            )
        parsed = _parse_iso(values)
        _check_some_parsed(values, parsed, path, column, "ISO-8601 date-times")
        return parsed
    if pa.types.is_integer(tp):  # exact integer path: float64 would round big ms values
        ints = _flat(pc.cast(values, pa.int64(), safe=False))
        if unit == "s":
            return ints
        # Floor division (Arrow's integer divide truncates toward zero: -1 ms would be 0 s).
        shifted = pc.subtract(ints, pc.if_else(pc.less(ints, 0), 999, 0))
        return pc.divide(shifted, 1000)
    if is_text:
        numbers = _text_to(values, pl.Float64)
        _check_some_parsed(
            values, numbers, path, column, f"numeric timestamps in {unit} (set ts_unit: iso for text dates)"
        )
    elif pa.types.is_floating(tp) or pa.types.is_null(tp):
        numbers = _flat(pc.cast(values, pa.float64()))
    else:
        raise InputFileError(path, f"expected timestamps, got column type {tp}", column)
    finite = pc.if_else(pc.is_finite(numbers), numbers, pa.scalar(None, pa.float64()))
    seconds = pc.floor(pc.divide(finite, 1000.0)) if unit == "ms" else pc.floor(finite)
    # Clip before the cast so absurd numbers become out-of-range rows instead of overflow.
    seconds = pc.max_element_wise(pc.min_element_wise(seconds, 2.0**62, skip_nulls=False), -(2.0**62), skip_nulls=False)
    return pc.cast(seconds, pa.int64())


# ---------------------------------------------------------------- row checks


def _reason_masks(raw: pa.Table, value_min: float, value_max: float) -> dict[str, np.ndarray]:
    def arr(name: str, fill) -> np.ndarray:
        return raw[name].fill_null(fill).to_numpy()

    user, item, ts = arr("user_id", 0), arr("item_id", 0), arr("ts", 0)
    value = raw["value"].fill_null(np.nan).to_numpy()
    with np.errstate(invalid="ignore"):
        return {
            "invalid_user_id": raw["user_id"].is_null().to_numpy(zero_copy_only=False),
            "negative_user_id": user < 0,
            "invalid_item_id": raw["item_id"].is_null().to_numpy(zero_copy_only=False),
            "negative_item_id": item < 0,
            "invalid_ts": raw["ts"].is_null().to_numpy(zero_copy_only=False),
            "ts_out_of_range": (ts < TS_MIN_S) | (ts >= TS_MAX_S),
            "invalid_value": ~np.isfinite(value),
            "value_out_of_range": (value < value_min) | (value > value_max),
        }


def validate_events(
    raw: pa.Table,
    value_min: float,
    value_max: float,
    max_samples: int = 5,
    row_offset: int = 1,
) -> tuple[pa.Table, ValidationReport]:
    """Split coerced raw events (user_id, item_id, ts, value; nullable) into clean rows and a report.

    Clean rows keep the input's order and carry no nulls. ``row_offset`` turns a row's
    position into the number logged in samples (1 = first data row).
    """
    missing = [c for c in RAW_EVENT_COLUMNS if c not in raw.column_names]
    if missing:
        raise ValueError(f"validate_events needs columns {RAW_EVENT_COLUMNS}, missing {missing}")
    n = raw.num_rows
    masks = _reason_masks(raw, value_min, value_max)
    rejected_any = np.zeros(n, dtype=bool)
    counts: dict[str, int] = {}
    first_reason = np.full(n, -1, dtype=np.int8)
    for i, reason in enumerate(REASONS):
        new = masks[reason] & ~rejected_any
        first_reason[new] = i
        counts[reason] = int(new.sum())
        rejected_any |= new
    bad_rows = np.flatnonzero(rejected_any)[:max_samples]
    samples = tuple(
        f"row {int(r) + row_offset} ({REASONS[first_reason[r]]}): "
        + str({c: raw[c][int(r)].as_py() for c in RAW_EVENT_COLUMNS})
        for r in bad_rows
    )
    report = ValidationReport(total_rows=n, rejected=counts, samples=samples)
    if report.num_rejected:
        logger.warning("validation: %s", report.summary())
        for line in samples:
            logger.warning("  rejected %s", line)
    clean = raw.select(list(RAW_EVENT_COLUMNS)).filter(pa.array(~rejected_any))
    return clean, report


def check_reject_threshold(report: ValidationReport, max_reject_frac: float, source: str) -> None:
    """Raise RejectThresholdError when more than ``max_reject_frac`` of the rows were rejected."""
    if report.total_rows and report.reject_frac > max_reject_frac:
        raise RejectThresholdError(
            f"{source}: {report.summary()} — above ingest.max_reject_frac={max_reject_frac}; nothing was written"
        )
