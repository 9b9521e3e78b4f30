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

from components.ts_units import TsRange, unit_hint

logger = logging.getLogger(__name__)

# The widest range validate_events accepts by default, [1970-01-01, 2200-01-01); the ingest
# stage narrows it to ingest.min_ts_s .. now + ingest.max_ts_ahead_s (components/ts_units.py).
TS_MIN_S = 0
TS_MAX_S = 7_258_118_400
WIDEST_TS_RANGE = TsRange(TS_MIN_S, TS_MAX_S)

# Row checks in order; a row is counted under the FIRST reason it fails.
REASONS = (
    "invalid_user_id",
    "non_integer_user_id",
    "user_id_too_large",
    "negative_user_id",
    "invalid_item_id",
    "non_integer_item_id",
    "item_id_too_large",
    "negative_item_id",
    "invalid_ts",
    "ts_out_of_range",
    "invalid_value",
    "value_out_of_range",
)
RAW_EVENT_COLUMNS = ("user_id", "item_id", "ts", "value")
# Optional int8 columns of raw events: why a non-empty id cell has no value (ParsedIds.flaw).
ID_FLAW_COLUMNS = {"user_id": "user_id_flaw", "item_id": "item_id_flaw"}

# ParsedIds.flaw codes. A null id with ID_OK was empty or not a number (invalid_*_id).
ID_OK = 0
ID_NON_INTEGER = 1  # a number that is not exactly an integer: "1.5", "1e3", NaN, a float beyond 2^53
ID_TOO_LARGE = 2  # an integer above 2^63 - 1 (int64's maximum)
ID_TOO_SMALL = 3  # an integer below -2^63: counted as a negative id
INT64_MAX = 2**63 - 1
# A float64 holds every integer up to 2^53 only; above it, ids read as floats may be rounded.
FLOAT_EXACT_MAX = 2.0**53
# Integer text, optionally with a zero fraction ("12", "+12", "12.0"); parsed without a float.
_INTEGER_TEXT = r"^[+-]?\d+(\.0*)?$"


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
    hint: str | None = None  # e.g. the timestamps look like the other unit (components/ts_units.py)

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def reject_frac(self) -> float:
        return self.num_rejected / self.total_rows if self.total_rows else 0.0

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in self.rejected.items() if v) or "none"
        hint = f" ({self.hint})" if self.hint else ""
        return (
            f"{self.num_rejected}/{self.total_rows} rows rejected ({self.reject_frac:.2%}); by reason: {reasons}{hint}"
        )


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


@dataclass(frozen=True)
class ParsedIds:
    """An id column parsed exactly (never through a float64, which rounds ids above 2^53)."""

    values: pa.Array  # (n,) int64; null where the cell is empty or holds no valid int64 id
    flaw: np.ndarray  # (n,) int8 ID_* code: why a non-empty cell has no value (ID_OK otherwise)


def _ids_from_text(values: pa.ChunkedArray | pa.Array) -> ParsedIds:
    text = pl.from_arrow(_flat(values).cast(pa.large_string())).str.strip_chars()
    is_integer = text.str.contains(_INTEGER_TEXT).fill_null(False)
    digits = text.str.replace(r"\.0*$", "")
    ints = pl.select(pl.when(is_integer).then(digits.cast(pl.Int64, strict=False))).to_series()
    out_of_range = (is_integer & ints.is_null()).to_numpy()
    negative = digits.str.starts_with("-").fill_null(False).to_numpy()
    is_number = text.cast(pl.Float64, strict=False).is_not_null().to_numpy()
    flaw = np.full(len(text), ID_OK, np.int8)
    flaw[is_number & ~is_integer.to_numpy()] = ID_NON_INTEGER
    flaw[out_of_range & ~negative] = ID_TOO_LARGE
    flaw[out_of_range & negative] = ID_TOO_SMALL
    return ParsedIds(ints.to_arrow().cast(pa.int64()), flaw)


def _ids_from_numbers(values: pa.ChunkedArray | pa.Array) -> ParsedIds:
    tp = values.type
    flaw = np.full(len(values), ID_OK, np.int8)
    if pa.types.is_unsigned_integer(tp):
        too_large = pc.greater(values, pa.scalar(INT64_MAX, pa.uint64())).fill_null(False)
        flaw[too_large.to_numpy(zero_copy_only=False)] = ID_TOO_LARGE
        values = pc.if_else(too_large, pa.scalar(None, tp), values)
    if pa.types.is_integer(tp) or pa.types.is_null(tp):
        return ParsedIds(_flat(pc.cast(values, pa.int64())), flaw)
    as_float = pc.cast(values, pa.float64())
    exact = pc.and_(pc.is_finite(as_float), pc.less_equal(pc.abs(as_float), FLOAT_EXACT_MAX))
    integral = pc.and_(exact, pc.equal(pc.floor(as_float), as_float))
    flaw[pc.and_(pc.is_valid(as_float), pc.invert(integral)).fill_null(False).to_numpy(zero_copy_only=False)] = (
        ID_NON_INTEGER
    )
    out = pc.if_else(integral, as_float, pa.scalar(None, pa.float64()))
    return ParsedIds(_flat(pc.cast(out, pa.int64())), flaw)


def coerce_ids(values: pa.ChunkedArray | pa.Array, path: str, column: str) -> ParsedIds:
    """Id column -> exact int64 ids (negatives kept for the row checks) and per-row flaws.

    Text is parsed as integers, never through a float; a numeric column (Parquet) is taken
    as is, except floats beyond 2^53 and unsigned values above 2^63 - 1. A column where no
    cell is an id at all is a file error (the wrong column, not a few bad rows).
    """
    tp = values.type
    if pa.types.is_string(tp) or pa.types.is_large_string(tp):
        parsed = _ids_from_text(values)
    elif pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_null(tp):
        parsed = _ids_from_numbers(values)
    else:
        raise InputFileError(path, f"expected integer ids, got column type {tp}", column)
    if not (parsed.flaw != ID_OK).any():
        _check_some_parsed(values, parsed.values, path, column, "integer ids")
    return parsed


def raw_events(user_id: ParsedIds, item_id: ParsedIds, ts: pa.Array, value: pa.Array) -> pa.Table:
    """Coerced raw events, as :func:`validate_events` takes them (ids with their flaw columns)."""
    return pa.table(
        {
            "user_id": user_id.values,
            "item_id": item_id.values,
            "ts": ts,
            "value": value,
            ID_FLAW_COLUMNS["user_id"]: pa.array(user_id.flaw, pa.int8()),
            ID_FLAW_COLUMNS["item_id"]: pa.array(item_id.flaw, pa.int8()),
        }
    )


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


def _id_masks(raw: pa.Table, name: str) -> dict[str, np.ndarray]:
    """Masks of the four id reasons of column ``name`` ("user" or "item")."""
    column = f"{name}_id"
    flaw_column = ID_FLAW_COLUMNS[column]
    flaw = raw[flaw_column].to_numpy() if flaw_column in raw.column_names else np.zeros(raw.num_rows, np.int8)
    is_null = raw[column].is_null().to_numpy(zero_copy_only=False)
    return {
        f"invalid_{column}": is_null & (flaw == ID_OK),
        f"non_integer_{column}": flaw == ID_NON_INTEGER,
        f"{column}_too_large": flaw == ID_TOO_LARGE,
        f"negative_{column}": (raw[column].fill_null(0).to_numpy() < 0) | (flaw == ID_TOO_SMALL),
    }


def _reason_masks(raw: pa.Table, value_min: float, value_max: float, ts_range: TsRange) -> dict[str, np.ndarray]:
    ts = raw["ts"].fill_null(0).to_numpy()
    value = raw["value"].fill_null(np.nan).to_numpy()
    with np.errstate(invalid="ignore"):
        return {
            **_id_masks(raw, "user"),
            **_id_masks(raw, "item"),
            "invalid_ts": raw["ts"].is_null().to_numpy(zero_copy_only=False),
            "ts_out_of_range": ~ts_range.contains(ts),
            "invalid_value": ~np.isfinite(value),
            "value_out_of_range": (value < value_min) | (value > value_max),
        }


def _first_reasons(masks: dict[str, np.ndarray], num_rows: int) -> np.ndarray:
    """(num_rows,) int8: index in REASONS of the first check each row fails, -1 for clean rows."""
    first_reason = np.full(num_rows, -1, dtype=np.int8)
    for i, reason in enumerate(REASONS):
        first_reason[masks[reason] & (first_reason < 0)] = i
    return first_reason


def validate_events(
    raw: pa.Table,
    value_min: float,
    value_max: float,
    max_samples: int = 5,
    row_offset: int = 1,
    ts_range: TsRange = WIDEST_TS_RANGE,
    declared_ts_unit: str | None = None,
) -> tuple[pa.Table, ValidationReport]:
    """Split coerced raw events (user_id, item_id, ts, value; nullable) into clean rows and a report.

    Clean rows keep the input's order and carry no nulls. ``row_offset`` turns a row's
    position into the number logged in samples (1 = first data row). Times outside
    ``ts_range`` are ``ts_out_of_range``; when most are and they fit the other unit than
    ``declared_ts_unit`` (the user's ``ingest.events.ts_unit``), the report carries a hint.
    """
    missing = [c for c in RAW_EVENT_COLUMNS if c not in raw.column_names]
    if missing:
        raise ValueError(f"validate_events needs columns {RAW_EVENT_COLUMNS}, missing {missing}")
    n = raw.num_rows
    first_reason = _first_reasons(_reason_masks(raw, value_min, value_max, ts_range), n)
    rejected_any = first_reason >= 0
    counts = {reason: int((first_reason == i).sum()) for i, reason in enumerate(REASONS)}
    bad_rows = np.flatnonzero(rejected_any)[:max_samples]
    samples = tuple(
        f"row {int(r) + row_offset} ({REASONS[first_reason[r]]}): "
        + str({c: raw[c][int(r)].as_py() for c in RAW_EVENT_COLUMNS})
        for r in bad_rows
    )
    hint = unit_hint(pc.drop_null(raw["ts"]).to_numpy(), declared_ts_unit, ts_range)
    report = ValidationReport(total_rows=n, rejected=counts, samples=samples, hint=hint)
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
