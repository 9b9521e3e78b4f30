"""Timestamp units that cannot be right: hints for ms-as-s and s-as-ms, the plausible range."""

from __future__ import annotations

import numpy as np

from components.ts_units import DEFAULT_MIN_TS_S, TsRange, near_epoch_message, unit_hint

NOW_S = 1_700_000_000
RANGE = TsRange.from_config(DEFAULT_MIN_TS_S, 86_400, now_s=NOW_S)
SECONDS = np.arange(1_600_000_000, 1_600_000_000 + 60 * 100, 60)  # a log in seconds


def test_default_range_is_1990_to_a_day_after_now():
    assert DEFAULT_MIN_TS_S == 631_152_000  # 1990-01-01T00:00:00Z
    inside = RANGE.contains(np.array([631_152_000, 631_151_999, NOW_S + 86_400, NOW_S + 86_401]))
    assert inside.tolist() == [True, False, True, False]


def test_milliseconds_declared_as_seconds_get_the_ms_hint():
    assert unit_hint(SECONDS * 1000, "s", RANGE) == "looks like milliseconds: set ingest.events.ts_unit=ms"
    assert unit_hint(SECONDS, "s", RANGE) is None
    # A few bad rows in a good log are rejected rows, not a unit problem.
    assert unit_hint(np.concatenate([SECONDS, SECONDS[:3] * 1000]), "s", RANGE) is None
    assert unit_hint(SECONDS * 1000, None, RANGE) is None  # the unit is not the user's setting


def test_seconds_declared_as_milliseconds_get_the_s_hint():
    as_if_ms = SECONDS // 1000  # what coerce_ts makes of seconds read as ms: January 1970
    assert unit_hint(as_if_ms, "ms", RANGE) == "looks like seconds: set ingest.events.ts_unit=s"
    message = near_epoch_message(as_if_ms, "ms")
    assert message is not None and "within 8 weeks after 1970-01-01" in message
    assert message.endswith("looks like seconds: set ingest.events.ts_unit=s")
    assert near_epoch_message(SECONDS, "s") is None
    assert near_epoch_message(np.array([5, 10, 2_000_000_000]), "ms") is None  # not ALL near the epoch
    assert "ts_unit" in near_epoch_message(np.array([5, 10]), "s")
