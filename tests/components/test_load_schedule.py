"""Seeded load schedules: deterministic, the asked-for arrival statistics, JSONL round trip."""

from __future__ import annotations

import numpy as np
import pytest

from components.load_schedule import LoadConfig, make_schedule, read_schedule, write_schedule

USERS = list(range(1000, 1200))
ITEMS = list(range(5000, 7000))


def test_same_seed_same_schedule_and_it_round_trips(tmp_path):
    cfg = LoadConfig(rate_per_s=50, duration_s=10, seed=3)
    a, b = make_schedule(cfg, USERS, ITEMS), make_schedule(cfg, USERS, ITEMS)
    assert a == b and a != make_schedule(LoadConfig(rate_per_s=50, duration_s=10, seed=4), USERS, ITEMS)
    write_schedule(tmp_path / "s.jsonl", a)
    assert read_schedule(tmp_path / "s.jsonl") == a


def test_rate_burstiness_sizes_users_and_classes_are_as_configured():
    poisson = make_schedule(LoadConfig(rate_per_s=100, duration_s=60, seed=0), USERS, ITEMS)
    bursty = make_schedule(LoadConfig(rate_per_s=100, duration_s=60, arrivals="bursty", burstiness=4), USERS, ITEMS)
    for schedule in (poisson, bursty):
        assert len(schedule) == pytest.approx(6000, rel=0.1)
        assert all(r.at_ms < 60_000 for r in schedule)
    cv2 = lambda s: np.var(np.diff([r.at_ms for r in s])) / np.mean(np.diff([r.at_ms for r in s])) ** 2
    assert cv2(poisson) == pytest.approx(1.0, abs=0.15) and cv2(bursty) == pytest.approx(4.0, rel=0.3)
    sizes = np.array([len(r.candidates) for r in poisson])
    assert sizes.min() >= 10 and sizes.max() <= 500 and np.median(sizes) < sizes.mean()  # heavy tail
    assert all(len(set(r.candidates)) == len(r.candidates) for r in poisson)
    users = np.unique([r.user_id for r in poisson], return_counts=True)[1]
    assert users.max() > 20 * np.median(users)  # Zipf: a few heavy users
    share = np.mean([r.slo_class == "tight" for r in poisson])
    assert share == pytest.approx(0.5, abs=0.03)


def test_bad_schedule_file_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"at_ms": 1, "request_id": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not a scheduled request"):
        read_schedule(path)
    with pytest.raises(ValueError, match="candidates_min"):
        LoadConfig(candidates_min=0)
