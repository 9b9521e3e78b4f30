"""Column coercion (clear file/column errors) and row validation (counts by reason)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.validation import (
    ID_NON_INTEGER,
    ID_OK,
    ID_TOO_LARGE,
    ID_TOO_SMALL,
    REASONS,
    TS_MAX_S,
    InputFileError,
    RejectThresholdError,
    check_reject_threshold,
    coerce_ids,
    coerce_ts,
    coerce_values,
    validate_events,
)


def raw(user, item, ts, value) -> pa.Table:
    return pa.table(
        {
            "user_id": pa.array(user, pa.int64()),
            "item_id": pa.array(item, pa.int64()),
            "ts": pa.array(ts, pa.int64()),
            "value": pa.array(value, pa.float64()),
        }
    )


def test_ids_from_ints_floats_and_text():
    ids = coerce_ids(pa.array([1, -2, None]), "f", "u")
    assert ids.values.to_pylist() == [1, -2, None] and ids.flaw.tolist() == [ID_OK] * 3
    ids = coerce_ids(pa.array([1.0, 2.5, float("nan"), 2.0**60]), "f", "u")
    assert ids.values.to_pylist() == [1, None, None, None]
    assert ids.flaw.tolist() == [ID_OK, ID_NON_INTEGER, ID_NON_INTEGER, ID_NON_INTEGER]  # 2^60: float skips ints
    text = pa.chunked_array([["7", " 8 ", "x"], ["", None]])
    assert coerce_ids(text, "f", "u").values.to_pylist() == [7, 8, None, None, None]


def test_ids_are_parsed_exactly_from_text_never_through_a_float():
    cells = [str(2**53 + 1), str(2**53 + 3), "1.0", "+7", "007", "1.5", "1e3", str(2**63 - 1), str(2**63)]
    cells += [str(-(2**63) - 1), "x", None]
    ids = coerce_ids(pa.array(cells), "f", "u")
    # 2^53 + 1 and 2^53 + 3 read as floats would both round to even neighbours (two users merged).
    assert ids.values.to_pylist() == [2**53 + 1, 2**53 + 3, 1, 7, 7, None, None, 2**63 - 1, None, None, None, None]
    ok, frac, big, small = ID_OK, ID_NON_INTEGER, ID_TOO_LARGE, ID_TOO_SMALL
    assert ids.flaw.tolist() == [ok, ok, ok, ok, ok, frac, frac, ok, big, small, ok, ok]
    unsigned = coerce_ids(pa.array([2**64 - 1, 5], pa.uint64()), "f", "u")  # Parquet uint64
    assert unsigned.values.to_pylist() == [None, 5] and unsigned.flaw.tolist() == [ID_TOO_LARGE, ID_OK]


def test_id_flaws_are_rejected_rows_with_their_own_reasons():
    table = raw([1, None, None, 2, -4], [1, 1, 1, None, 1], [1_600_000_000] * 5, [1.0] * 5)
    flaw = pa.array([ID_OK, ID_NON_INTEGER, ID_TOO_LARGE, ID_OK, ID_OK], pa.int8())
    table = table.append_column("user_id_flaw", flaw).append_column("item_id_flaw", pa.array([0] * 5, pa.int8()))
    clean, report = validate_events(table, 0.0, 5.0)
    assert clean["user_id"].to_pylist() == [1]
    counts = {k: v for k, v in report.rejected.items() if v}
    assert counts == {"non_integer_user_id": 1, "user_id_too_large": 1, "invalid_item_id": 1, "negative_user_id": 1}


def test_ids_of_the_wrong_kind_name_file_and_column():
    with pytest.raises(InputFileError, match=r"ev\.csv, column 'user'.*integer ids.*'alice'"):
        coerce_ids(pa.array(["alice", "bob"]), "ev.csv", "user")
    with pytest.raises(InputFileError, match=r"ev\.csv, column 'user'.*bool"):
        coerce_ids(pa.array([True, False]), "ev.csv", "user")


def test_values():
    assert coerce_values(pa.array([1, 2]), "f", "v").to_pylist() == [1.0, 2.0]
    assert coerce_values(pa.array(["3.5", "zz"]), "f", "v").to_pylist() == [3.5, None]
    with pytest.raises(InputFileError, match="column 'v'.*numbers"):
        coerce_values(pa.array(["good", "bad"]), "f", "v")


def test_ts_units():
    assert coerce_ts(pa.array([1_600_000_000]), "s", "f", "t").to_pylist() == [1_600_000_000]
    assert coerce_ts(pa.array([1_600_000_000_999, -1]), "ms", "f", "t").to_pylist() == [1_600_000_000, -1]
    assert coerce_ts(pa.array([1.6e9 + 0.7, float("inf")]), "s", "f", "t").to_pylist() == [1_600_000_000, None]
    assert coerce_ts(pa.array(["1600000000", "?"]), "s", "f", "t").to_pylist() == [1_600_000_000, None]
    iso = pa.array(["2020-09-13T12:26:40Z", "2020-09-13 14:26:40+02:00", "not a date", None])
    assert coerce_ts(iso, "iso", "f", "t").to_pylist() == [1_600_000_000, 1_600_000_000, None, None]
    # A file mixing dates and date-times: both parse (second pass).
    mixed = pa.array(["2020-09-13T12:26:40", "2020-09-14"])
    assert coerce_ts(mixed, "iso", "f", "t").to_pylist() == [1_600_000_000, 1_600_041_600]
    native = pa.array([1_600_000_000_000], pa.timestamp("ms", tz="UTC"))
    assert coerce_ts(native, "s", "f", "t").to_pylist() == [1_600_000_000]


def test_ts_wrong_kind_is_a_file_error():
    with pytest.raises(InputFileError, match="column 't'.*ts_unit: iso"):
        coerce_ts(pa.array(["2020-01-01", "2020-01-02"]), "s", "ev.csv", "t")
    with pytest.raises(InputFileError, match="column 't'.*ts_unit is 'iso'"):
        coerce_ts(pa.array([1, 2]), "iso", "ev.csv", "t")
    with pytest.raises(InputFileError, match="column 't'.*ISO-8601"):
        coerce_ts(pa.array(["soon", "later"]), "iso", "ev.csv", "t")


def test_every_reason_is_counted_once_with_samples():
    table = raw(
        user=[1, None, -1, 1, 1, 1, 1, 1, 1, None],
        item=[1, 1, 1, None, -3, 1, 1, 1, 1, -1],
        ts=[100, 100, 100, 100, 100, None, TS_MAX_S, 100, 100, None],
        value=[4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, math.nan, 9.0, math.nan],
    )
    clean, report = validate_events(table, 0.0, 5.0, max_samples=3)
    assert clean.num_rows == 1 and clean.to_pylist()[0] == {"user_id": 1, "item_id": 1, "ts": 100, "value": 4.0}
    assert report.rejected == {
        "invalid_user_id": 2,
        "non_integer_user_id": 0,
        "user_id_too_large": 0,
        "negative_user_id": 1,
        "invalid_item_id": 1,
        "non_integer_item_id": 0,
        "item_id_too_large": 0,
        "negative_item_id": 1,
        "invalid_ts": 1,
        "ts_out_of_range": 1,
        "invalid_value": 1,
        "value_out_of_range": 1,
    }
    assert report.num_rejected == 9 and report.total_rows == 10
    assert len(report.samples) == 3 and report.samples[0].startswith("row 2 (invalid_user_id)")
    assert "9/10 rows rejected" in report.summary()


def test_threshold():
    _, report = validate_events(raw([1, -1], [1, 1], [5, 5], [1.0, 1.0]), 0.0, 5.0)
    check_reject_threshold(report, 0.5, "ev.csv")
    with pytest.raises(RejectThresholdError, match=r"ev\.csv: 1/2 rows rejected.*max_reject_frac=0.4"):
        check_reject_threshold(report, 0.4, "ev.csv")


row = st.tuples(
    st.one_of(st.none(), st.integers(-3, 3)),
    st.one_of(st.none(), st.integers(-3, 3)),
    st.one_of(st.none(), st.integers(-10, TS_MAX_S + 10)),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=64)),
)


@settings(max_examples=25, deadline=None)
@given(st.lists(row, min_size=0, max_size=40))
def test_clean_rows_satisfy_every_check_and_counts_add_up(rows):
    table = raw(*zip(*rows)) if rows else raw([], [], [], [])
    clean, report = validate_events(table, 0.5, 5.0)
    assert clean.num_rows + report.num_rejected == len(rows)
    assert set(report.rejected) == set(REASONS)
    expected = [
        r
        for r in rows
        if r[0] is not None
        and r[0] >= 0
        and r[1] is not None
        and r[1] >= 0
        and r[2] is not None
        and 0 <= r[2] < TS_MAX_S
        and r[3] is not None
        and math.isfinite(r[3])
        and 0.5 <= r[3] <= 5.0
    ]
    assert [tuple(d.values()) for d in clean.to_pylist()] == expected
    assert clean.num_rows == 0 or all(c.null_count == 0 for c in clean.columns)
    assert np.isfinite(clean["value"].to_numpy()).all()
