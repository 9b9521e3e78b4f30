"""components.lr_schedule: the dense rate's factor per step, by hand."""

from __future__ import annotations

import pytest

from components.lr_schedule import lr_factor


def test_constant_is_one_at_every_step():
    assert [lr_factor("constant", s, 4) for s in range(4)] == [1.0, 1.0, 1.0, 1.0]


def test_linear_falls_from_one_to_one_over_total_at_the_last_step():
    assert [lr_factor("linear", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor("linear", 0, 1) == 1.0  # a one-step run takes its one step at the full rate


def test_bad_schedule_or_step_is_named():
    with pytest.raises(ValueError, match="'cosine' is not one of"):
        lr_factor("cosine", 0, 4)
    with pytest.raises(ValueError, match="step 4 outside"):
        lr_factor("linear", 4, 4)
    with pytest.raises(ValueError, match="step -1 outside"):
        lr_factor("linear", -1, 4)
