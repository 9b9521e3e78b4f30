"""The load test's latency axis: a few plain, distinct ticks over any range."""

from __future__ import annotations

import pytest

from pipelines.loadtest import log_ticks


@pytest.mark.parametrize(("low", "high"), [(30.2, 44.9), (1.3, 4800.0), (7.0, 7.0), (0.0, 12.0)])
def test_log_ticks_are_few_distinct_round_values_over_the_range(low, high):
    ticks = log_ticks(low, high)
    assert 1 <= len(ticks) <= 5 and ticks == sorted(set(ticks))
    assert all(float(f"{t:.2g}") == t for t in ticks)  # two significant digits: short labels
    assert ticks[0] <= max(low, 1e-3) * 1.05 and ticks[-1] >= high * 0.95


def test_a_narrow_range_still_gets_several_labels():
    assert log_ticks(30.2, 44.9) == [30.0, 33.0, 37.0, 41.0, 45.0]
